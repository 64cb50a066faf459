"""Exact k-nearest-neighbour search with bounded memory.

Neighbours are found with ||a||^2 - 2 a.b + ||b||^2 (one matrix product per block), but the
(queries x bank) matrix is never materialised at once: queries and, when the bank is large, the
bank itself are processed in blocks of at most `chunk` entries.  The returned distances of the
chosen neighbours are then recomputed directly as ||a - b||, which the product trick loses to
cancellation for near-identical points (float32: ~1e-3 absolute instead of ~1e-7).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

# Elements of one (query block x bank block) distance matrix: 2^21 floats = 8 MiB, where smaller
# blocks stay in cache between the product and the minimum (eager torch, 1024 queries x 10 240 bank
# rows: 45 ms against 54 ms with 2^24, best of 12, one thread).  Exported graphs use the same: on
# this AMD EPYC (1 MiB L2 per core, 32 MiB L3) OpenVINO ran PatchCore's 8-bit search at 256 px
# (batch 8, one thread) in 80 ms with 2^21 or 2^20, 91 ms with 2^22 and 96 ms with one 2^24
# product, float32 indifferent (252 / 253 ms); an earlier 2-core Xeon with AMX had preferred the
# single large product (35.5 against 46.7 ms per image).
DEFAULT_CHUNK = 1 << 21


def squared_distances(queries: torch.Tensor, bank: torch.Tensor,
                      q_sq: torch.Tensor | None = None, b_sq: torch.Tensor | None = None) -> torch.Tensor:
    """(Q, M) squared Euclidean distances, clamped at 0 (rounding can make the trick slightly negative)."""
    q_sq = (queries * queries).sum(1) if q_sq is None else q_sq
    b_sq = (bank * bank).sum(1) if b_sq is None else b_sq
    d2 = torch.addmm(b_sq.unsqueeze(0), queries, bank.T, beta=1.0, alpha=-2.0)
    return d2.add_(q_sq.unsqueeze(1)).clamp_(min=0)


# Whether an exported graph adds the bank norms as a separate bias (see _ranking_product).
_SEPARATE_NORMS = contextvars.ContextVar("separate_norms", default=False)


@contextlib.contextmanager
def norms_as_bias(enabled: bool = True) -> Iterator[None]:
    """Trace the ranking product as `queries @ bank.T + norms` (INT8 export) instead of one product."""
    token = _SEPARATE_NORMS.set(enabled)
    try:
        yield
    finally:
        _SEPARATE_NORMS.reset(token)


def _ranking_product(q: torch.Tensor, minus_2b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """||b||^2 - 2 q.b for every (query, bank row) pair.

    Eager torch and INT8 graphs: one product plus a per-column bias (torch's addmm and OpenVINO's
    8-bit kernel fuse the two).  Float graphs fold the bias into the product as one more column,
    [q, 1] @ [-2b, ||b||^2].T: OpenVINO's float32 product cannot fuse a bias and spent a separate
    pass on it (PatchCore at 256 px, one thread: 50 -> 37 ms per image; ONNX Runtime 44 -> 38 ms).
    INT8 keeps the bias apart: in a per-row weight scale the norm column would dwarf the features.
    """
    if not torch.compiler.is_exporting() or _SEPARATE_NORMS.get():
        return torch.addmm(b_sq.unsqueeze(0), q, minus_2b.T)
    ones = q.new_ones(q.shape[0], 1)
    return torch.cat([q, ones], 1) @ torch.cat([minus_2b, b_sq.unsqueeze(1)], 1).T


# Columns per block of the exported arg-min (see _row_min).
ARGMIN_BLOCK = 128


def _row_min(d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row minima (R, 1) and the first column holding each: `d2.min(dim=1, keepdim=True)`.

    Exported graphs compute it in two levels instead: the minimum of every block of ARGMIN_BLOCK
    columns (one reduction over the distances), the arg-min over those block minima, then the
    arg-min inside the winning block.  OpenVINO runs an arg-min as a TopK, which over the whole
    row took 73 of PatchCore's 130 ms at 256 px (1024 x 10 240 distances, one thread); over ~80
    block minima and 128 columns it is negligible.  Eager torch keeps its own fused min.
    """
    if not torch.compiler.is_exporting():
        return d2.min(dim=1, keepdim=True)
    rows, cols = d2.shape
    block = ARGMIN_BLOCK
    full = cols // block * block
    minima = [d2[:, :full].reshape(rows, full // block, block).amin(dim=2)] if full else []
    if full < cols:  # the last, shorter block
        minima.append(d2[:, full:].amin(dim=1, keepdim=True))
    d, best = torch.cat(minima, dim=1).min(dim=1, keepdim=True)  # first block holding the minimum
    columns = best * block + torch.arange(block, device=d2.device)  # (R, block)
    inside = d2.gather(1, columns.clamp_max(cols - 1)).masked_fill(columns >= cols, float("inf"))
    return d, best * block + inside.min(dim=1, keepdim=True).indices


@torch.no_grad()
def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, k: int = 1,
                      chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (Q, k) and indices (Q, k) of the k nearest bank rows of every query row, nearest first.

    queries: (Q, D), bank: (M, D), k <= M. `chunk` bounds the number of distances held at once
    (default: DEFAULT_CHUNK).
    """
    chunk = chunk or DEFAULT_CHUNK
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"expected (Q, D) queries and (M, D) bank, got {tuple(queries.shape)} and {tuple(bank.shape)}")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [1, {bank.shape[0]}] (the bank size), got {k}")
    # Centre both sets on the bank mean: distances are unchanged, but the norms shrink, which
    # limits the cancellation error of the ||a||^2 - 2ab + ||b||^2 trick for nearby points.
    mean = bank.mean(0, keepdim=True)
    bank = bank - mean
    b_sq = (bank * bank).sum(1)
    # Keep -2 b instead of b (in place: no second copy of the bank): the product then needs no
    # separate scaling pass.  Power-of-two factors are exact in floating point, so 0.5 * (-2 b)
    # below is -b bit for bit.
    minus_2b = bank.mul_(-2.0)
    m, dim = minus_2b.shape
    bank_block = max(k, min(m, chunk))  # a bank block alone never exceeds `chunk` rows
    # Query rows per block: bounded by the distance block and by the (rows, k, D) exact recomputation.
    q_block = max(1, min(chunk // bank_block, chunk // (k * dim)))
    out_d = queries.new_empty(queries.shape[0], k)
    out_i = torch.empty(queries.shape[0], k, dtype=torch.long, device=queries.device)
    for qs in range(0, queries.shape[0], q_block):
        q = queries[qs:qs + q_block] - mean
        best_d = best_i = None
        for bs in range(0, m, bank_block):
            # ||b||^2 - 2 a.b ranks the bank like the squared distance (||a||^2 is constant per
            # row and the chosen distances are recomputed exactly below): two passes fewer over
            # the block, and min instead of topk for the common k = 1.
            d2 = _ranking_product(q, minus_2b[bs:bs + bank_block], b_sq[bs:bs + bank_block])
            if k == 1:
                d, i = _row_min(d2)
            else:
                d, i = d2.topk(min(k, d2.shape[1]), dim=1, largest=False)
            i = i + bs
            if best_d is not None:  # merge with the best of the previous bank blocks
                d, pos = torch.cat([best_d, d], 1).topk(k, dim=1, largest=False)
                i = torch.cat([best_i, i], 1).gather(1, pos)
            best_d, best_i = d, i
        exact = (q.unsqueeze(1) + 0.5 * minus_2b[best_i]).norm(dim=2)  # q - b
        exact, order = exact.sort(dim=1)  # recomputed values may swap near-equal neighbours
        out_d[qs:qs + q_block] = exact
        out_i[qs:qs + q_block] = best_i.gather(1, order)
    return out_d, out_i


class NearestNeighbours(torch.nn.Module):
    """`nearest_distances` as a (stateless) module, so that an exported graph knows which
    operations are the search: INT8 export can quantise its ranking product by module path
    (`int8_modules`) and leave the rest of the model float."""

    def forward(self, queries: torch.Tensor, bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return nearest_distances(queries, bank, k=k)
