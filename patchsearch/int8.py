"""Exact k-NN on CPUs with int8 dot-product instructions: an int8 candidate pass, exact
fp32 re-ranking, and a per-query check that sends doubtful queries to exact FAISS search.

Used by :class:`patchsearch.index.PatchIndex` only on request (``exact="int8"``, flat
banks on CPU, torch >= 2.3): ``exact="auto"`` never picks it, since on this project's
Intel Xeon with AVX512-VNNI and AMX-INT8 it was slower than ``faiss.IndexFlatL2`` in 13 of
18 measurements and faster at no shape in all three runs (see the README's int8 table).
It pays only where the CPU has int8 dot-product instructions. The int8 codes are built
on the first search, never on load.
"""

from __future__ import annotations

import threading

import numpy as np

from .errors import InputError
from .searchers import rerank

MIN_TORCH = (2, 3)  # torch._int_mm's CPU kernel


def torch_has_int_mm() -> bool:
    """True where the installed torch has ``torch._int_mm`` on CPU (torch >= 2.3)."""
    import torch

    try:
        major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= MIN_TORCH and hasattr(torch, "_int_mm")


class Int8Searcher:
    """Exact-result k-NN over a bank: an int8 candidate pass, exact fp32 re-ranking, and a check.

    1. Bank and queries are centred on the bank mean and quantized to int8 with one
       scale per row (s = max|x| / 127). ``||b||^2 - 2 q.b`` is computed from one int8
       matmul per query chunk (``torch._int_mm``, int32 accumulation, exact; on CPUs with
       VNNI about 4x the fp32 matmul rate) and the ``candidates`` smallest are kept.
    2. The candidates are re-ranked with exact fp32 L2 computed on the differences
       (:func:`rerank`), which is more accurate than the ``||x||^2 - 2 x.y + ||y||^2``
       expansion that FAISS and torch use.
    3. Check: rounding to nearest leaves each dot product with an error of standard
       deviation ``sigma = sqrt((||b||^2 s_q^2 + ||q||^2 s_b^2) / 12)``. If the exact k-th
       squared distance is below ``||q||^2 +`` the largest candidate value minus
       ``2 * 7 sigma`` (bank-wide maxima of ||b|| and s_b), no row outside the
       candidates is closer unless its rounding error exceeds 7 standard deviations;
       other queries are searched again exactly with ``faiss.IndexFlatL2``.

    The int8 codes (M x d bytes, plus per-row norms and scales) are built on the first
    :meth:`search` (:meth:`prepare`), not by the constructor: loading an index stays fast.

    Args:
        bank: float32 (M, d) memory bank.
        fallback: a searcher with ``search(queries, k)`` giving exact results.
        candidates: candidate count per query (>= k + 1).
        chunk: queries per int8 matmul (bounds the (chunk, M) score matrix).

    Raises:
        InputError: torch older than 2.3 (no ``torch._int_mm`` on CPU).
    """

    SIGMAS = 7.0

    def __init__(self, bank: np.ndarray, fallback, candidates: int = 32, chunk: int = 1024):
        if not torch_has_int_mm():
            import torch

            raise InputError(f"int8 exact search needs torch >= 2.3 (torch._int_mm on CPU), found {torch.__version__}")
        self.bank = bank
        self.fallback = fallback
        self.candidates = candidates
        self.chunk = chunk
        self.codes_t = None  # int8 (d, M), built by prepare()
        self._lock = threading.Lock()
        self.fallbacks = 0  # queries that failed the check (for benchmarks)

    def prepare(self) -> None:
        """Quantize the bank (once; chunked, no float copy of the whole bank)."""
        import torch

        with self._lock:
            if self.codes_t is None:
                self._quantize()

    def _quantize(self) -> None:
        import torch

        bank = self.bank
        m, d = bank.shape
        total = np.zeros(d, np.float64)
        for s in range(0, m, 65536):  # float64 sum chunk by chunk: no (M, d) float64 copy
            total += np.asarray(bank[s:s + 65536], dtype=np.float64).sum(0)
        self.mean = torch.from_numpy((total / m).astype(np.float32))
        self.norms = torch.empty(m)
        self.scale = torch.empty(m)
        codes = torch.empty((m, d), dtype=torch.int8)
        for s in range(0, m, 65536):  # chunked: no float copy of the whole bank
            b = torch.from_numpy(np.array(bank[s:s + 65536], dtype=np.float32)) - self.mean
            self.norms[s:s + len(b)] = (b * b).sum(1)
            self.scale[s:s + len(b)] = b.abs().amax(1).clamp_min(1e-30) / 127
            codes[s:s + len(b)] = torch.round(b / self.scale[s:s + len(b), None]).to(torch.int8)
        codes_t = codes.T.contiguous()  # (d, M)
        del codes
        self.max_norm_sq = float(self.norms.max())
        self.max_scale = float(self.scale.max())
        self.codes_t = codes_t  # last: a search that sees it sees everything above

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact squared L2 float32 (n, k) and bank rows int64 (n, k) of float32 (n, d) queries."""
        import torch

        self.prepare()
        n = len(queries)
        c = min(max(self.candidates, k + 1), len(self.bank))
        dist = np.empty((n, k), np.float32)
        rows = np.empty((n, k), np.int64)
        q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        with torch.no_grad():
            for s in range(0, n, self.chunk):
                q = q_all[s:s + self.chunk] - self.mean
                sq = q.abs().amax(1).clamp_min(1e-30) / 127
                codes = torch.round(q / sq[:, None]).to(torch.int8)
                approx = torch._int_mm(codes, self.codes_t).float()
                approx.mul_((-2 * sq)[:, None]).mul_(self.scale[None, :]).add_(self.norms)
                cand_d, cand = approx.topk(c, dim=1, largest=False, sorted=False)
                del approx
                d2, r = rerank(queries[s:s + self.chunk], self.bank, cand.numpy(), k)
                if c < len(self.bank):
                    qn = (q * q).sum(1)
                    sigma = ((self.max_norm_sq * sq * sq + qn * self.max_scale ** 2) / 12).sqrt()
                    bound = (cand_d.max(1).values + qn - 2 * self.SIGMAS * sigma).numpy()
                    bad = np.nonzero(d2[:, -1] > bound)[0]
                    if bad.size:
                        self.fallbacks += int(bad.size)
                        d2[bad], r[bad] = self.fallback.search(queries[s:s + self.chunk][bad], k)
                dist[s:s + len(q)], rows[s:s + len(q)] = d2, r
        return dist, rows
