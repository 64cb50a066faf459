"""Greedy k-center coreset selection (Gonzalez 1985; PatchCore's Algorithm 1), fast and memory-bounded.

The textbook loop picks the point farthest from the selected set, then refreshes the distance of
*every* point to the set: one (N x d) pass per step, which makes it memory-bandwidth bound
(anomalib's version needs minutes for 60 images).  `greedy_coreset(method="greedy")` returns the
*same* selection but skips the points the new centre cannot be nearer to, by the triangle
inequality: a point p whose nearest centre is c_j can only move to the new centre c if
d(c, c_j) < 2 d(p, c_j).  Late in the loop the new centre is far from almost every cluster, so a
step touches a few hundred points instead of N; what remains per step is a handful of O(N) scalar
passes (argmax, gather, compare) that read ~2% of the bytes of the textbook loop.
"""
from __future__ import annotations

import math

import torch

from ..progress import track
from .knn import nearest_distances

# Steps per progress-bar update: updating the bar every step would cost more than the step.
_PROGRESS_EVERY = 512


@torch.no_grad()
def random_projection(x: torch.Tensor, dim: int, seed: int = 0, chunk: int = 65536) -> torch.Tensor:
    """Johnson-Lindenstrauss projection of (N, D) rows to (N, dim) with a seeded Gaussian matrix.

    Entries are N(0, 1/dim) so that squared distances are preserved in expectation.  Returns
    `x` itself (as contiguous float32) when dim >= D: projecting up only costs time.
    """
    n, d = x.shape
    if dim >= d:
        return x.float().contiguous()
    gen = torch.Generator().manual_seed(seed)
    proj = (torch.randn(d, dim, generator=gen, dtype=torch.float32) / math.sqrt(dim)).to(x.device)
    out = torch.empty(n, dim, dtype=torch.float32, device=x.device)
    for s in range(0, n, chunk):  # chunked so a float64 or half input never gets a full float32 copy
        torch.mm(x[s:s + chunk].float(), proj, out=out[s:s + chunk])
    return out


@torch.no_grad()
def greedy_coreset(x: torch.Tensor, size: int, *, method: str = "greedy", seed: int = 0,
                   progress: bool = True) -> torch.Tensor:
    """Indices (size,) of a greedy k-center coreset of the rows of `x` (N, d), in selection order.

    method: "greedy" is exact (identical to the textbook loop); "approx" is documented in
    `_greedy_batched`.  The first centre is drawn at random with `seed`.
    """
    n = x.shape[0]
    if not 1 <= size <= n:
        raise ValueError(f"coreset size must be in [1, {n}], got {size}")
    if method not in ("greedy", "approx"):
        raise ValueError(f"method must be 'greedy' or 'approx', got {method!r}")
    if size == n:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    # Distances are translation invariant; centring shrinks the norms and so the rounding error.
    x = x.float()
    x = (x - x.mean(0)).contiguous()
    return _greedy_exact(x, size, start, progress)


def _sq_dist_to(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Exact squared distances of every row of x to the vector c, in chunks (no N x d temporary)."""
    return torch.cat([(x[s:s + chunk] - c).square_().sum(1) for s in range(0, x.shape[0], chunk)])


def _greedy_exact(x: torch.Tensor, size: int, start: int, progress: bool) -> torch.Tensor:
    n, d = x.shape
    sq = (x * x).sum(1)
    # Safety margin for the pruning test: the centre-to-centre distances below use the fast
    # norm trick, whose float32 error is bounded by ~d * eps * ||a|| ||b|| (<= 1e-5 * max ||x||^2).
    # A margin only adds candidates; it never changes the result.
    tol = 3e-5 * float(sq.max())
    selected = torch.empty(size, dtype=torch.long, device=x.device)
    centers = x.new_empty(size, d)
    centers_sq = x.new_empty(size)
    min_d = _sq_dist_to(x, x[start])  # squared distance of every point to its nearest centre
    nearest = torch.zeros(n, dtype=torch.long, device=x.device)  # which centre that is
    selected[0], centers[0], centers_sq[0] = start, x[start], sq[start]

    blocks = range(1, size, _PROGRESS_EVERY)
    for first in track(blocks, "Coreset selection") if progress else blocks:
        for t in range(first, min(first + _PROGRESS_EVERY, size)):
            c = int(min_d.argmax())  # the farthest point becomes the next centre
            xc = x[c]
            selected[t], centers[t], centers_sq[t] = c, xc, sq[c]
            # d(c, c_j)^2 for every earlier centre j, then the per-cluster bound d(c, c_j)^2 / 4.
            bound = torch.addmv(centers_sq[:t], centers[:t], xc, alpha=-2.0).add_(sq[c] - tol).mul_(0.25 / (1 + 1e-4))
            cand = (min_d > bound[nearest]).nonzero().squeeze(1)
            dist = (x.index_select(0, cand) - xc).square_().sum(1)
            closer = dist < min_d.index_select(0, cand)
            moved = cand[closer]
            min_d[moved] = dist[closer]
            nearest[moved] = t
    return selected


@torch.no_grad()
def coverage_radius(x: torch.Tensor, selected: torch.Tensor) -> float:
    """Coreset radius: the largest distance from any row of x to its nearest selected row."""
    dist, _ = nearest_distances(x, x[selected], k=1)
    return float(dist.max())
