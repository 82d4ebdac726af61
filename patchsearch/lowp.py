"""Exact k-NN from reduced-precision candidates: a bf16 or int8 GEMM over the whole bank,
exact fp32 re-ranking of the best candidates, and a proof per query that they hold the
exact top k (queries without one are searched again, wider, then with fp32 FAISS).

:class:`LowpSearcher` answers exactly what an exhaustive fp32 search answers (the same
neighbours up to ties within fp32 rounding, distances computed on the differences
``q - x`` as :func:`patchsearch.searchers.rerank` does); only the candidate stage runs
in reduced precision, on the CPU's matrix units where it has them (AMX, AVX512-BF16,
VNNI), through torch's oneDNN:

* ``bf16``: ``torch.mm`` of bfloat16 matrices (fp32 accumulation, bf16 output);
* ``int8``: ``torch.ops.onednn.qlinear_pointwise`` (u8 x s8, exact int32 accumulation,
  fp32 output); a probe at preparation checks that the int32 sums are exact (no int16
  saturation on CPUs without VNNI) and falls back to 7-bit bank codes, else to fp32.

The bound (both kinds; bank and queries centred on the bank mean, p = q - mean,
y = x - mean, ``~`` the reduced-precision values, e = y - y~ and e_p = p - p~, norms
computed exactly)::

    |<p, y> - <p~, y~>| <= ||p~|| ||e|| + ||e_p|| ||y||         (Cauchy-Schwarz)

plus the GEMM's own rounding (fp32 accumulation of exact bf16 products; bf16 output
rounding, relative 2^-8; int8: exact integer sums, a few fp32 roundings) and that of the
fp32 centring and re-ranking. bf16 folds the bound into the GEMM (8 extra columns:
||p||^2, ||y||^2 split into 3 bfloat16 parts each, and the two error products rounded
up), so it ranks rows by a lower bound L(y) <= ||q - x||^2 itself; int8 ranks by the
estimate and subtracts the bank-wide largest error. A query's c candidates are provably
complete when its exact k-th distance is below the lower bound of every row outside
them; else the check is repeated with :data:`WIDEN` x c candidates from the same
scores, and a query that still fails is searched with the fp32 fallback
(``faiss.IndexFlatL2``) and re-ranked (same distances as the others).

Chosen by :func:`choose` (``exact="auto"``): see :func:`measured_kind`. Needs torch only
when chosen; ``import patchsearch`` and the fp32 path never import it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import threading

import numpy as np

from .errors import InputError
from .searchers import rerank

PRECISIONS = ("fp32", "bf16", "int8", "auto")
U32 = 2.0 ** -24        # unit roundoff of float32
U_BF16 = 2.0 ** -8      # of bfloat16 (8-bit significand)
CANDIDATES = {"bf16": 32, "int8": 64}  # candidate rows per query before widening (at least k + 8)
WIDEN = 8               # the second try takes WIDEN x as many from the same scores
CHUNK_ELEMENTS = 2 ** 24  # queries per GEMM chunk: (chunk, M) scores of at most this many elements
# ``auto`` takes the reduced-precision stage only for banks where its fixed costs pay:
MIN_ROWS = 4096
INT8_MIN_DIM = 512      # int8 pays from here on (VNNI CPUs without AMX), see :func:`measured_kind`


def measured_kind(flags: frozenset, dim: int) -> str:
    """The candidate kind measured fastest for a CPU with ``flags`` and embeddings of ``dim``.

    Measured on a 2-core Xeon with AMX (other CPUs stood in for by ``ONEDNN_MAX_CPU_ISA``
    and ``FAISS_OPT_LEVEL``; search of real bottle patches and their 512-/1536-d lifts, k = 9,
    against ``faiss.IndexFlatL2``; see scripts/bench_search_eq7.py and the benchmarks docs):

    =====================  ==================  ==============  ==============
    CPU                    d = 152             d = 512         d = 1536
    =====================  ==================  ==============  ==============
    AMX (``amx_bf16``)     bf16 1.2-2x         bf16 2.5x       bf16 2.5-4x
    AVX512-BF16, no AMX    bf16 1.2x, int8 1x  -               bf16 0.8x, int8 1.7x
    AVX512-VNNI            int8 0.8x           int8 1.6x       int8 1.8x
    AVX2-VNNI              -                   -               int8 1.9x
    AVX2 (no VNNI)         int8 0.7x           -               int8 1.0x
    =====================  ==================  ==============  ==============

    Returns ``"bf16"`` with AMX; ``"int8"`` with VNNI (AVX-512 or AVX2) from
    :data:`INT8_MIN_DIM` on; ``"fp32"`` otherwise.
    """
    if "amx_bf16" in flags:
        return "bf16"
    if dim >= INT8_MIN_DIM and ("avx512_vnni" in flags or "avx_vnni" in flags):
        return "int8"
    return "fp32"


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset:
    """The CPU's feature flags (``/proc/cpuinfo``'s ``flags``, lower case); empty where
    there is no /proc/cpuinfo (then ``auto`` keeps fp32)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def torch_available() -> bool:
    """True where torch can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def int8_gemm_available() -> bool:
    """True where the installed torch has oneDNN's quantized linear (``onednn::qlinear_pointwise``)."""
    if not torch_available():
        return False
    import torch

    try:
        return hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack")
    except (AttributeError, RuntimeError):
        return False


def choose(precision: str, rows: int, dim: int, on_gpu: bool = False) -> str:
    """The candidate precision a flat CPU searcher uses: ``"fp32"``, ``"bf16"`` or ``"int8"``.

    Args:
        precision: ``"fp32"`` (also ``"faiss"``: ``faiss.IndexFlatL2`` only), ``"bf16"``,
            ``"int8"``, or ``"auto"``: the kind :func:`measured_kind` gives for this CPU
            (:func:`cpu_features`) and ``dim``, for banks of at least
            :data:`MIN_ROWS` rows on the CPU with torch installed; fp32 otherwise.
        rows, dim: the bank's shape.
        on_gpu: the index is on a GPU (always fp32 here).

    Raises:
        InputError: unknown precision, or bf16/int8 requested without torch (int8: without
            oneDNN's quantized linear).
    """
    if precision == "faiss":
        precision = "fp32"
    if precision not in PRECISIONS:
        raise InputError(f"exact must be one of fp32 (faiss), bf16, int8, auto; got {precision!r}")
    if precision == "auto":
        if on_gpu or rows < MIN_ROWS or not torch_available():
            return "fp32"
        kind = measured_kind(cpu_features(), dim)
        return "fp32" if kind == "int8" and not int8_gemm_available() else kind
    if precision != "fp32" and not torch_available():
        raise InputError(f"exact={precision!r} needs torch (pip install torch), or use exact='fp32'")
    if precision == "int8" and not int8_gemm_available():
        import torch

        raise InputError(f"exact='int8' needs torch with oneDNN's quantized linear "
                         f"(torch.ops.onednn.qlinear_pointwise), not in torch {torch.__version__}")
    return precision


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns of finite values, rounded to nearest even (through float32)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def bf16_value(bits: np.ndarray) -> np.ndarray:
    """float64 values of uint16 bfloat16 bit patterns."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _split3(v: np.ndarray) -> np.ndarray:
    """float64 (n,) -> float64 (n, 3) bfloat16-exact parts summing to v up to 2^-24 |v|."""
    out = np.empty((len(v), 3))
    rest = np.asarray(v, np.float64)
    for i in range(3):
        out[:, i] = bf16_value(bf16_bits(rest))
        rest = rest - out[:, i]
    return out


def _bf16_up(v: np.ndarray) -> np.ndarray:
    """Non-negative float64 -> bfloat16-exact float64 values >= v."""
    return bf16_value(bf16_bits(np.asarray(v, np.float64) * (1 + 2.0 ** -7)))


class LowpSearcher:
    """Exact k-NN over a bank with a bf16 or int8 candidate stage (see the module doc).

    Args:
        bank: float32 (M, d) memory bank (a memory map is fine).
        fallback: exact fp32 searcher (``search(queries, k)``) for queries whose candidate
            set could not be proven complete.
        kind: ``"bf16"`` or ``"int8"``.
        candidates: candidate rows per query before widening (at least k + 8; default
            :data:`CANDIDATES` of the kind).
        group: rows per candidate group (:func:`select`; default :func:`group_size`).
        chunk: queries per GEMM (default: :data:`CHUNK_ELEMENTS` / M, within [16, 4096]).

    Attributes:
        stats: {"queries", "widened", "fallbacks"} counts since construction.

    The codes (bf16: M x (d + 8) x 2 bytes; int8: M x d bytes) are built on the first
    :meth:`search` (:meth:`prepare`), not by the constructor.
    """

    def __init__(self, bank: np.ndarray, fallback, kind: str = "bf16", candidates: int | None = None,
                 group: int | None = None, chunk: int | None = None):
        if kind not in ("bf16", "int8"):
            raise InputError(f"reduced-precision kind must be bf16 or int8, got {kind!r}")
        self.bank = bank
        self.fallback = fallback
        self.kind = kind
        self.candidates = int(candidates or CANDIDATES[kind])
        self.group = group
        self.chunk = chunk or int(min(4096, max(16, CHUNK_ELEMENTS // max(1, len(bank)))))
        self.stats = {"queries": 0, "widened": 0, "fallbacks": 0}
        self._state = None
        self._lock = threading.Lock()

    # preparation ----------------------------------------------------------------------
    def prepare(self) -> None:
        """Build the codes and per-row bounds (once)."""
        with self._lock:
            if self._state is None:
                self._state = self._prepare_bf16() if self.kind == "bf16" else self._prepare_int8()

    def _centred_rows(self):
        """Yield (start, float32 centred rows, float64 squared norms) chunk by chunk."""
        bank = self.bank
        for s in range(0, len(bank), 65536):
            y = np.asarray(bank[s:s + 65536], dtype=np.float32) - self._mean
            yield s, y, np.einsum("ij,ij->i", y.astype(np.float64), y.astype(np.float64))

    def _common(self) -> dict:
        m, d = self.bank.shape
        total = np.zeros(d, np.float64)
        for s in range(0, m, 65536):
            total += np.asarray(self.bank[s:s + 65536], dtype=np.float64).sum(0)
        self._mean = (total / m).astype(np.float32)
        return {"m": m, "d": d, "mean": self._mean}

    def _prepare_bf16(self) -> dict:
        import torch

        st = self._common()
        m, d = st["m"], st["d"]
        width = -(-(d + 8) // 32) * 32  # AMX tiles: a multiple of 32 bfloat16
        if not _bf16_accumulates_in_fp32(width):
            st["broken"] = True  # this torch's bf16 matmul rounds partial sums: search in fp32
            return st
        bits = np.zeros((m, width), np.uint16)
        r_max = e_max = 0.0
        for s, y, n2 in self._centred_rows():
            bits[s:s + len(y), :d] = bf16_bits(y)
            err = np.sqrt(((y.astype(np.float64) - bf16_value(bits[s:s + len(y), :d])) ** 2).sum(1))
            extra = np.concatenate([_split3(-n2 / 2), np.ones((len(y), 3)), _bf16_up(err * (1 + 1e-6))[:, None],
                                    _bf16_up(np.sqrt(n2) * (1 + 1e-6))[:, None]], 1)
            bits[s:s + len(y), d:d + 8] = bf16_bits(extra)
            r_max, e_max = max(r_max, float(extra[:, 7].max())), max(e_max, float(extra[:, 6].max()))
        codes = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
        st.update(codes=codes, width=width, r_max=r_max, e_max=e_max)
        return st

    def _prepare_int8(self) -> dict:
        import torch

        st = self._common()
        m, d = st["m"], st["d"]
        top = 127 if _int8_exact(127) else 63 if _int8_exact(63) else 0
        if not top:
            st["broken"] = True  # this CPU's int8 GEMM does not sum exactly: search in fp32
            return st
        codes = torch.empty((m, d), dtype=torch.int8)
        scale = np.empty(m, np.float32)
        norms2 = np.empty(m, np.float64)
        errs = np.empty(m, np.float64)
        r_max = e_max = 0.0
        for s, y, n2 in self._centred_rows():
            sc = np.maximum(np.abs(y).max(1), 1e-30).astype(np.float32) / np.float32(top)
            c = np.clip(np.rint(y / sc[:, None]), -top, top)
            err = np.sqrt(((y.astype(np.float64) - c * sc[:, None].astype(np.float64)) ** 2).sum(1))
            codes[s:s + len(y)] = torch.from_numpy(c.astype(np.int8))
            scale[s:s + len(y)], norms2[s:s + len(y)], errs[s:s + len(y)] = sc, n2, err * (1 + 1e-6)
            r_max, e_max = max(r_max, float(np.sqrt(n2.max()))), max(e_max, float(err.max()))
        st.update(packed=torch.ops.onednn.qlinear_prepack(codes, None), scale=torch.from_numpy(scale),
                  zeros=torch.zeros(m, dtype=torch.int64), norms2=norms2, errs=errs, norms=np.sqrt(norms2) * (1 + 1e-6),
                  r_max=r_max, r_codes=r_max + e_max)
        return st

    # search ---------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact squared L2 float32 (n, k) and bank rows int64 (n, k) of float32 (n, d) queries."""
        import torch

        self.prepare()
        st = self._state
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n, m = len(queries), st["m"]
        if st.get("broken"):
            return self._fallback(queries, k)
        c = min(max(self.candidates, k + 8), m)
        dist = np.empty((n, k), np.float32)
        rows = np.empty((n, k), np.int64)
        widened = fallbacks = 0
        with torch.no_grad():
            for s in range(0, n, self.chunk):
                q = queries[s:s + self.chunk]
                keys, terms = self._keys(q)
                d2, r, ok = self._try(q, keys, terms, c, k)
                bad = np.nonzero(~ok)[0]
                if bad.size and c < m:
                    widened += int(bad.size)
                    d2[bad], r[bad], ok2 = self._try(q[bad], keys[bad], {t: v[bad] for t, v in terms.items()},
                                                     c * WIDEN, k)
                    bad = bad[~ok2]
                if bad.size:
                    fallbacks += int(bad.size)
                    d2[bad], r[bad] = self._fallback(q[bad], k)
                dist[s:s + len(q)], rows[s:s + len(q)] = d2, r
        with self._lock:
            self.stats["queries"] += n
            self.stats["widened"] += widened
            self.stats["fallbacks"] += fallbacks
        return dist, rows

    def _fallback(self, q: np.ndarray, k: int):
        _, r = self.fallback.search(q, k)
        return rerank(q, self.bank, r, k)  # distances computed as for the other queries

    def _keys(self, q: np.ndarray):
        """numpy (n, M) keys of the chunk's queries (smaller = nearer; bf16: the int16 bit
        patterns of negative bfloat16 scores, int8: fp32 estimates) and float64 (n,) terms
        of the bound."""
        import torch

        st = self._state
        d = st["d"]
        p = q - st["mean"]
        p64 = p.astype(np.float64)
        pn2 = np.einsum("ij,ij->i", p64, p64)
        big = (np.sqrt(pn2) + st["r_max"]) ** 2 * 1.01 + 1e-30  # >= the sum of |terms| of one score
        if self.kind == "bf16":
            bits = np.zeros((len(q), st["width"]), np.uint16)
            bits[:, :d] = bf16_bits(p)
            pb = bf16_value(bits[:, :d])
            pbn = _bf16_up(np.sqrt(np.einsum("ij,ij->i", pb, pb)) * (1 + 1e-6))
            epn = _bf16_up(np.sqrt(((p64 - pb) ** 2).sum(1)) * (1 + 1e-6))
            gamma = (st["width"] + 8) * U32 / (1 - (st["width"] + 8) * U32)
            # shift every score below 0 (then the int16 bit patterns order as the scores, reversed)
            shift = 2.2 * (pbn * st["e_max"] + epn * st["r_max"]) + (2 * gamma + 2.0 ** -12) * big
            extra = np.concatenate([np.ones((len(q), 3)), _split3(-pn2 / 2 - shift), pbn[:, None], epn[:, None]], 1)
            bits[:, d:d + 8] = bf16_bits(extra)  # all bfloat16-exact
            qb = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
            scores = torch.mm(qb, st["codes"].T)  # ~ -(lower bound of ||q - x||^2) / 2 - shift
            return scores.view(torch.int16).numpy().view(np.uint16), {"pn2": pn2, "big": big * 1.01 + shift,
                                                                     "shift": shift}
        sp = max(float(np.abs(p).max()), 1e-30) / 127.0
        codes = np.clip(np.rint(p / np.float32(sp)), -127, 127)
        pb64 = codes.astype(np.float64) * sp
        pbn = np.sqrt(np.einsum("ij,ij->i", pb64, pb64))
        epn = np.sqrt(((p64 - pb64) ** 2).sum(1))
        # bias: ||y||^2 - 2 eps(y), eps(y) >= |<p, y> - <p~, y~>| for every query of the chunk
        # (||p~|| ||e(y)|| + ||e_p|| ||y||, chunk-wide maxima of the query terms): the output is
        # then a lower bound of ||p - y||^2 - ||p||^2 per row (up to fp32 rounding)
        bias = st["norms2"] - 2 * (pbn.max() * st["errs"] + epn.max() * st["norms"])
        qx = torch.from_numpy((128 - codes).astype(np.uint8))  # (qx - 128) = -codes: the output is bias - 2 <p~, y~>
        scores = torch.ops.onednn.qlinear_pointwise(qx, 2 * sp, 128, st["packed"], st["scale"], st["zeros"],
                                                    torch.from_numpy(bias.astype(np.float32)), 1.0, 0,
                                                    torch.float32, "none", [], "")
        return scores.numpy(), {"pn2": pn2, "big": (np.sqrt(pn2) + st["r_codes"]) ** 2 * 1.01 + 2 * abs(bias).max()}

    def _try(self, q, keys, terms, c, k):
        """Re-rank the c best-keyed rows of each query; returns (squared L2 (n, k), rows
        (n, k), bool (n,): candidate set proven complete)."""
        st = self._state
        cand, thr, bad = select(keys, c, self.group or min(64, group_size(st["m"], c)))
        d2, r = rerank(q, self.bank, cand, k)
        pn2 = terms["pn2"]
        if thr is None:  # every row was a candidate
            return d2, r, ~bad
        if self.kind == "bf16":
            worst = bf16_value(thr.astype(np.uint16))
            up = worst + U_BF16 * np.abs(worst) / (1 - U_BF16)  # the largest fp32 sum behind this bf16 score
            gamma = (st["width"] + 8) * U32 / (1 - (st["width"] + 8) * U32)
            low = -2 * (up + terms["shift"]) - 2 * gamma * terms["big"] - 4 * U32 * terms["big"]
        else:
            i = (thr.astype(np.uint32) ^ np.uint32(0x80000000)).view(np.int32)
            worst = (i ^ ((i >> 31) & 0x7FFFFFFF)).view(np.float32).astype(np.float64)
            low = pn2 + worst - 8 * U32 * terms["big"]
        delta = 1.001 * U32 * (np.sqrt(pn2) + st["r_max"])  # fp32 centring of q and x
        low = np.maximum(np.sqrt(np.maximum(low, 0.0)) - delta, 0.0) ** 2
        kth = d2[:, -1].astype(np.float64) * (1 + (st["d"] + 4) * U32)  # fp32 re-ranking
        return d2, r, ~bad & (kth < low)  # bf16: every score negative, as the shift makes them


def _sortable(keys: np.ndarray) -> np.ndarray:
    """Unsigned keys ordered as ``keys``: uint16 as they are (bf16 bit patterns of
    negative scores), float32 through its bit pattern (as uint32)."""
    if keys.dtype == np.uint16:
        return keys
    i = keys.view(np.int32)
    return (i ^ ((i >> 31) & 0x7FFFFFFF)).view(np.uint32) ^ np.uint32(0x80000000)


def _smallest(keys: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns (n, c) of the c smallest of (n, w) keys (ties broken by column) and the
    largest :func:`_sortable` key taken (n,)."""
    n, w = keys.shape
    key = _sortable(keys)
    bits = 16 if key.dtype == np.uint16 and w < 2 ** 16 else 32
    wide = np.uint32 if bits == 16 else np.uint64
    comp = (key.astype(wide) << wide(bits)) | np.arange(w, dtype=wide)  # unique: exactly c per row below
    thr = np.partition(comp, c - 1, axis=1)[:, c - 1]
    cols = (np.flatnonzero(comp <= thr[:, None]) % w).reshape(n, c)
    return cols, (thr >> wide(bits)).astype(np.uint64)


def select(keys: np.ndarray, c: int, g: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The c rows with the smallest keys of each query, exactly, and a threshold that no
    other row's key is below.

    Rows form G = M // g strided groups {r, r + G, ..., r + (g-1) G}; the c groups with
    the smallest minimum hold the c smallest keys (each of those lies in a group whose
    minimum is at most it), so after one vectorised pass over the (n, M) keys (the
    group minima) the selection works on (n, G) minima and (n, c g) keys. The M - g G
    last rows are candidates of every query.

    Args:
        keys: (n, M) uint16 (bit patterns of negative bfloat16 scores: smaller = larger
            score) or float32, smaller = nearer.

    Returns:
        (int64 (n, c + M - g G) candidate rows, (n,) uint64 threshold: every other row
        has :func:`_sortable` key >= it, bool (n,) a uint16 key of the query was not a
        negative bfloat16), or (all rows, None, that bool) where c >= G.
    """
    n, m = keys.shape
    G = m // g
    if c >= G:
        bad = (keys < 0x8000).any(1) if keys.dtype == np.uint16 else np.zeros(n, bool)
        return np.ascontiguousarray(np.broadcast_to(np.arange(m, dtype=np.int64), (n, m))), None, bad
    mins = keys[:, :G * g].reshape(n, g, G).min(axis=1)
    bad = (mins < 0x8000).any(1) if keys.dtype == np.uint16 else np.zeros(n, bool)
    if m > G * g and keys.dtype == np.uint16:
        bad |= (keys[:, G * g:] < 0x8000).any(1)
    groups, _ = _smallest(mins, c)
    union = (groups[:, None, :] + (np.arange(g, dtype=np.int64) * G)[None, :, None]).reshape(n, c * g)
    flat = union + (np.arange(n, dtype=np.int64) * m)[:, None]
    cols, thr = _smallest(np.take(np.ascontiguousarray(keys).reshape(-1), flat), c)
    cand = np.take_along_axis(union, cols, 1)
    if m > G * g:
        cand = np.concatenate([cand, np.broadcast_to(np.arange(G * g, m, dtype=np.int64), (n, m - G * g))], 1)
    return np.ascontiguousarray(cand), thr, bad


def group_size(rows: int, c: int) -> int:
    """Rows per group for :func:`select`: the power of two nearest sqrt(rows / c) (the
    (n, G) minima and the (n, c g) union then cost about the same), within [1, 64]."""
    return int(2 ** round(math.log2(max(1.0, math.sqrt(rows / max(c, 1)))))) if rows > c else 1


@functools.lru_cache(maxsize=8)
def _bf16_accumulates_in_fp32(width: int) -> bool:
    """True where ``torch.mm`` of bfloat16 (16, width) x (width, 256) matrices keeps fp32
    partial sums (the bound assumes it): 2^16 + 64 x 1 - 2^16 must give 64, which bf16
    partial sums (spacing 512 at 2^16) would round to 0 or 512."""
    import torch

    a = torch.zeros((16, width), dtype=torch.bfloat16)
    b = torch.zeros((256, width), dtype=torch.bfloat16)
    ones = np.linspace(1, width - 2, min(64, width - 2)).astype(np.int64)
    a[:, 0], b[:, 0] = 256.0, 256.0
    a[:, width - 1], b[:, width - 1] = -256.0, 256.0
    a[:, ones], b[:, ones] = 1.0, 1.0
    want = float(len(np.unique(ones)))
    return bool((torch.mm(a, b.T).float() == want).all())


@functools.lru_cache(maxsize=4)
def _int8_exact(top: int) -> bool:
    """True where oneDNN's u8 x s8 linear sums exactly (int32) for bank codes in [-top, top]:
    probed on extreme codes, where CPUs without VNNI saturate 16-bit intermediate sums."""
    import torch

    d, m = 256, 64
    rng = np.random.default_rng(0)
    x = rng.choice(np.array([1, 255, 128, 0]), (8, d)).astype(np.uint8)
    x[0] = 255
    w = rng.choice(np.array([-top, top]), (m, d)).astype(np.int8)
    w[0] = top
    w[1] = -top
    try:
        out = torch.ops.onednn.qlinear_pointwise(
            torch.from_numpy(x), 1.0, 128, torch.ops.onednn.qlinear_prepack(torch.from_numpy(w), None),
            torch.ones(m), torch.zeros(m, dtype=torch.int64), None, 1.0, 0, torch.float32, "none", [], "")
    except RuntimeError:
        return False
    exact = (x.astype(np.int64) - 128) @ w.astype(np.int64).T
    return bool(np.array_equal(out.double().numpy(), exact.astype(np.float64)))
