"""Exact k-NN and Eq. 7 in torch, on whatever device the tensors live (CUDA or CPU).

The search path of a :class:`~patchsearch.index.PatchIndex` on a CUDA device where
faiss-gpu is not installed (and, with ``exact="torch"``, on the CPU, where it is tested
against FAISS). One stage, :func:`knn`, takes (queries, bank, k, device, precision):

1. Candidates: ``||b||^2 - 2 q.b`` by one matmul per query chunk in ``precision``
   (``fp32``; ``tf32``; ``bf16`` or ``fp16`` inputs with fp32 accumulation), the
   ``candidates`` smallest kept (``torch.topk``).
2. Exact re-rank: squared L2 of the candidates from fp32 differences (as
   ``faiss.knn_L2sqr_by_idx``), the k smallest kept, ascending.
3. Check: rounding the inputs to ``precision`` (unit roundoff u) and accumulating d
   products in fp32 leaves each candidate score with an error of standard deviation at
   most ``sigma = 2 sqrt(2/3) u sqrt(min(max|q|^2 ||B||^2, ||q||^2 max|B|^2)) +
   sqrt(d/3) 2^-24 (2 ||q|| ||B|| + ||B||^2)`` (bank-wide maxima; where the products
   themselves come out rounded to bf16/fp16, on the CPU, ``2 u ||q|| ||B||`` more, as a
   hard bound). Where the exact k-th
   distance exceeds ``||q||^2`` + the largest candidate score - 7 sigma, a row outside the
   candidates could be nearer: that query is searched again by exact fp32 differences
   over the whole bank (``torch.cdist`` without the matmul form). Results are therefore
   exact whatever the precision; lower precisions are faster where the chip multiplies
   faster in them (tensor cores), at the price of more such second searches.

Importing this module imports torch.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
UNIT_ROUNDOFF = {"fp32": 0.0, "tf32": 2.0 ** -11, "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}  # of the inputs
_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
SIGMAS = 7.0
FP32_EXTRA = 16  # fp32 candidates beyond k
LOW_CANDIDATES = 64  # candidates of the reduced precisions (at least k + FP32_EXTRA)
_TF32_LOCK = threading.Lock()  # torch's TF32 switch is process-wide
QUERY_CHUNK_CUDA, QUERY_CHUNK_CPU = 4096, 1024  # queries per matmul (the bank goes in blocks of budget / chunk)


def check_precision(precision: str) -> str:
    """Raises InputError (naming ``precision``) unless it is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def as_tensor(array, device=None) -> torch.Tensor:
    """float32 C-contiguous tensor on ``device`` from a numpy array (a read-only memory map
    is fine: on the CPU it is shared, not copied) or a tensor."""
    if not isinstance(array, torch.Tensor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays: never written here
            array = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return array.to(device=device, dtype=torch.float32).contiguous()


@dataclass
class PreparedBank:
    """A memory bank on its device, with what :func:`knn` needs besides it.

    Attributes:
        bank: float32 (M, d) tensor.
        sq: float32 (M,) squared row norms.
        low: the bank in bf16/fp16 (for those precisions), else None.
        precision: the candidate precision it was prepared for.
        max_sq, max_abs: largest squared row norm and largest absolute entry (for the check).
    """

    bank: torch.Tensor
    sq: torch.Tensor
    low: torch.Tensor | None
    precision: str
    max_sq: float
    max_abs: float


def prepare_bank(bank, device=None, precision: str = "fp32") -> PreparedBank:
    """Put a float32 (M, d) bank (numpy or tensor) on ``device`` for :func:`knn` in ``precision``.

    Raises:
        InputError: unknown precision, or a bank that is not a non-empty (M, d) array.
    """
    check_precision(precision)
    b = as_tensor(bank, device)
    if b.ndim != 2 or not len(b):
        raise InputError(f"bank must be a non-empty (M, d) array, got {tuple(b.shape)}")
    sq = (b * b).sum(1)
    low = b.to(_LOW[precision]) if precision in _LOW else None
    return PreparedBank(b, sq, low, precision, float(sq.max()), float(b.abs().max()))


def _dots(q: torch.Tensor, pb: PreparedBank, a: int, b: int) -> tuple[torch.Tensor, bool]:
    """(q . bank[a:b], float32 (n, b - a); whether those products were rounded to the low
    precision on output: bf16/fp16 products come out in fp32 only on CUDA, ``out_dtype``)."""
    if pb.low is not None:
        ql, low = q.to(pb.low.dtype), pb.low[a:b]
        if q.device.type == "cuda":
            try:
                return torch.mm(ql, low.T, out_dtype=torch.float32), False
            except (TypeError, RuntimeError):  # torch without mm(out_dtype=)
                pass
        return (ql @ low.T).float(), True
    if q.device.type != "cuda":
        return q @ pb.bank[a:b].T, False
    with _TF32_LOCK:
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = pb.precision == "tf32"
        try:
            return q @ pb.bank[a:b].T, False
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before


def _budget(device: torch.device) -> int:
    """Elements of one (queries, bank rows) score block."""
    return 1 << 27 if device.type == "cuda" else 1 << 22


def _candidates(q: torch.Tensor, pb: PreparedBank, c: int, budget: int):
    """(the c smallest approximate scores ``||b||^2 - 2 q.b`` per query, their rows, whether
    products were rounded on output), over bank blocks of ``budget / len(q)`` rows."""
    m = len(pb.bank)
    step = max(c, budget // max(1, len(q)))
    best_s = best_i = None
    rounded = False
    for a in range(0, m, step):
        b = min(m, a + step)
        dots, r = _dots(q, pb, a, b)
        rounded |= r
        score = dots.mul_(-2).add_(pb.sq[a:b])
        del dots
        v, i = score.topk(min(c, b - a), dim=1, largest=False, sorted=False)
        del score
        i += a
        if best_s is not None:
            v, j = torch.cat([best_s, v], 1).topk(c, dim=1, largest=False, sorted=False)
            i = torch.cat([best_i, i], 1).gather(1, j)
        best_s, best_i = v, i
    return best_s, best_i, rounded


def exact_distances(q: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, budget: int) -> torch.Tensor:
    """float32 (n, c) squared L2 from fp32 differences between q (n, d) and bank[rows] (n, c)."""
    n, c = rows.shape
    out = torch.empty(n, c, device=q.device)
    step = max(1, budget // max(1, c * q.shape[1]))
    for s in range(0, n, step):
        diff = bank[rows[s:s + step]] - q[s:s + step, None, :]
        out[s:s + step] = (diff * diff).sum(-1)
    return out


def _full(q: torch.Tensor, bank: torch.Tensor, k: int, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN of few queries by fp32 differences over the whole bank (no matmul)."""
    best_d = torch.full((len(q), 0), float("inf"), device=q.device)
    best_i = torch.empty((len(q), 0), dtype=torch.int64, device=q.device)
    step = max(k, budget // max(1, len(q)))
    for s in range(0, len(bank), step):
        d2 = torch.cdist(q, bank[s:s + step], compute_mode="donot_use_mm_for_euclid_dist").square_()
        best_d = torch.cat([best_d, d2], 1)
        best_i = torch.cat([best_i, torch.arange(s, s + d2.shape[1], device=q.device).expand(len(q), -1)], 1)
        best_d, j = best_d.topk(min(k, best_d.shape[1]), dim=1, largest=False)
        best_i = best_i.gather(1, j)
    return best_d, best_i


def knn(queries, bank, k: int, device=None, precision: str = "fp32", *, candidates: int | None = None,
        budget: int | None = None, stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest bank rows (squared L2) of each query, in torch on ``device``.

    Args:
        queries: float32 (n, d), numpy or tensor (moved to ``device``).
        bank: float32 (M, d) numpy array or tensor, or a :class:`PreparedBank` (then
            ``precision`` is the one it was prepared for).
        k: neighbours per query (clipped to M).
        device: where to compute (default: the bank's device, or the queries').
        precision: candidate precision, one of :data:`PRECISIONS` (see the module docstring).
        candidates: candidates re-ranked per query (default k + 16 for fp32, 64 otherwise).
        budget: elements of one (query chunk, bank block) score block (bounds memory; default
            2^27 on CUDA, 2^22 on CPU); queries go 4096 (CPU: 1024) at a time.
        stats: if given, ``stats["rechecked"]`` is increased by the queries searched again.

    Returns:
        (float32 (n, k) exact squared L2 ascending, int64 (n, k) bank rows), tensors on ``device``.

    Raises:
        InputError: unknown precision, queries of another dimension than the bank.
    """
    if isinstance(bank, PreparedBank):
        pb = bank
    else:
        pb = prepare_bank(bank, device if device is not None else getattr(queries, "device", None), precision)
    dev = pb.bank.device
    q_all = as_tensor(queries, dev)
    m, d = pb.bank.shape
    if q_all.ndim != 2 or q_all.shape[1] != d:
        raise InputError(f"queries must be (n, {d}), got {tuple(q_all.shape)}")
    n, k = len(q_all), min(int(k), m)
    base = k + FP32_EXTRA if pb.precision == "fp32" else max(LOW_CANDIDATES, k + FP32_EXTRA)
    c = min(m, max(k, candidates or base))
    budget = budget or _budget(dev)
    u = UNIT_ROUNDOFF[pb.precision]
    if pb.precision == "fp32" and dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        u = UNIT_ROUNDOFF["tf32"]  # TF32 switched on by the caller: fp32 matmuls round their inputs
    acc = math.sqrt(d / 3.0) * 2.0 ** -24
    dist = torch.empty(n, k, device=dev)
    rows = torch.empty(n, k, dtype=torch.int64, device=dev)
    step = QUERY_CHUNK_CUDA if dev.type == "cuda" else QUERY_CHUNK_CPU
    with torch.no_grad():
        for s in range(0, n, step):
            q = q_all[s:s + step]
            cand_s, cand, rounded = _candidates(q, pb, c, budget)
            d2c = exact_distances(q, pb.bank, cand, budget)
            v, j = d2c.topk(k, dim=1, largest=False)
            r = cand.gather(1, j)
            if c < m:
                qsq = (q * q).sum(1)
                qinf = q.abs().amax(1)
                sigma = (2 * math.sqrt(2.0 / 3.0) * u * torch.minimum(qinf * qinf * pb.max_sq, qsq * pb.max_abs ** 2)
                         .sqrt() + acc * (2 * qsq.sqrt() * math.sqrt(pb.max_sq) + pb.max_sq))
                bound = cand_s.amax(1) + qsq - SIGMAS * sigma
                if rounded:  # products rounded to the low precision: |error| <= u |q| |b| (a hard bound)
                    bound -= 2 * u * qsq.sqrt() * math.sqrt(pb.max_sq)
                bad = (v[:, -1] > bound).nonzero().flatten()
                if len(bad):
                    if stats is not None:
                        stats["rechecked"] = stats.get("rechecked", 0) + int(len(bad))
                    v[bad], r[bad] = _full(q[bad], pb.bank, k, budget)
            dist[s:s + len(q)], rows[s:s + len(q)] = v, r
    return dist, rows


class TorchSearcher:
    """:class:`~patchsearch.searchers.Searcher` over a bank held on a torch device.

    ``search`` takes and returns numpy (the protocol); ``search_tensor`` keeps tensors on
    the device. The bank is copied to the device once, here (on the CPU it is shared).

    Args:
        bank: float32 (M, d) memory bank.
        device: torch device name (``cpu``, ``cuda``, ``cuda:N``).
        precision: candidate precision (:data:`PRECISIONS`).
    """

    def __init__(self, bank, device: str = "cpu", precision: str = "fp32"):
        self.device = torch.device(device)
        self.precision = check_precision(precision)
        self.prepared = prepare_bank(bank, self.device, precision)
        self.stats: dict = {}

    @property
    def bank(self) -> torch.Tensor:
        """float32 (M, d) bank on the device."""
        return self.prepared.bank

    def search_tensor(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(exact squared L2 float32 (n, k), rows int64 (n, k)) on the device."""
        return knn(queries, self.prepared, k, stats=self.stats)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(exact squared L2 float32 (n, k), rows int64 (n, k)) of float32 (n, d) numpy queries."""
        d2, rows = self.search_tensor(as_tensor(queries, self.device), k)
        return d2.cpu().numpy(), rows.cpu().numpy()


def faiss_knn(placed: list, starts: list[int], queries: torch.Tensor, k: int,
              successive: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """k-NN over FAISS shards taking torch tensors (``faiss.contrib.torch_utils``), merged on
    the queries' device: (squared L2 float32 (n, k), bank rows int64 (n, k)).

    Args:
        placed: the shards (GPU indexes read CUDA tensors on their own GPU; CPU indexes CPU tensors).
        starts: first bank row of each shard (added to its ids when ``successive``).
        queries: float32 (n, d) tensor.
        successive: flat shards (local ids 0..); False: the shards carry bank rows as ids.
    """
    import faiss.contrib.torch_utils  # noqa: F401  (index.search takes torch tensors)

    dists, ids = [], []
    for shard, start in zip(placed, starts):
        dev = f"cuda:{shard.getDevice()}" if hasattr(shard, "getDevice") else "cpu"
        d2, i = shard.search(queries.to(dev).contiguous(), k)
        i = i.to(queries.device)
        if successive:
            i = torch.where(i >= 0, i + start, i)
        dists.append(d2.to(queries.device))
        ids.append(i)
    if len(placed) == 1:
        return dists[0], ids[0]
    d2, i = torch.cat(dists, 1), torch.cat(ids, 1)
    v, j = d2.topk(k, dim=1, largest=False)
    return v, i.gather(1, j)


def reweighted_scores(test_patches: torch.Tensor, s_star: torch.Tensor, support_rows: torch.Tensor) -> torch.Tensor:
    """PatchCore Eq. 7 on the device, as :func:`patchsearch.score.reweighted_scores` (float64 inside).

    Args:
        test_patches: (N, d) m_test* of each image.
        s_star: (N,) its nearest-neighbour L2 distance.
        support_rows: (N, b, d) the bank rows of N_b(m*), m* first.

    Returns:
        float32 (N,) image scores (s* itself where b == 1).
    """
    s = s_star.double()
    if support_rows.shape[1] == 1:
        return s.float()
    diff = support_rows.double() - test_patches.double()[:, None, :]
    dist = (diff * diff).sum(-1).sqrt()
    z = torch.exp(dist - dist.amax(1, keepdim=True))
    return ((1.0 - z[:, 0] / z.sum(1)) * s).float()
