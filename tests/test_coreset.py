"""Coreset selection and k-NN search against naive reference implementations."""
from __future__ import annotations

import pytest
import torch

from anomalens.components.coreset import coverage_radius, greedy_coreset, random_projection
from anomalens.components.knn import nearest_distances


def naive_greedy(x: torch.Tensor, size: int, start: int = 0, given: int = 0) -> torch.Tensor:
    """The textbook k-center loop: refresh every point's distance to the set after each new centre
    (`given` > 0: starting from the first `given` rows as centres instead of `start`)."""
    min_d = torch.full((len(x),), float("inf"), dtype=x.dtype)
    selected = list(range(given)) if given else [start]
    for i in selected[:-1]:
        min_d = torch.minimum(min_d, ((x - x[i]) ** 2).sum(1))
    while len(selected) < size:
        min_d = torch.minimum(min_d, ((x - x[selected[-1]]) ** 2).sum(1))
        selected.append(int(min_d.argmax()))
    return torch.tensor(selected)


def blobs(n: int, d: int, seed: int) -> torch.Tensor:
    """Clustered points of uneven spread, like patch features (float64: no rounding near-ties)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, d, generator=g, dtype=torch.float64) * 5
    which = torch.randint(12, (n,), generator=g)
    scale = torch.rand(12, 1, generator=g, dtype=torch.float64) + 0.2
    return centres[which] + torch.randn(n, d, generator=g, dtype=torch.float64) * scale[which]


@pytest.mark.parametrize("pool_size", [4, 64, 512])
@pytest.mark.parametrize("data", ["blobs", "uniform"])
def test_greedy_equals_the_textbook_loop(pool_size, data):
    g = torch.Generator().manual_seed(1)
    x = blobs(700, 16, seed=2) if data == "blobs" else torch.rand(700, 16, generator=g, dtype=torch.float64)
    selected = greedy_coreset(x, 150, seed=3, progress=False, pool_size=pool_size)
    expected = naive_greedy(x, 150, start=int(selected[0]))
    assert torch.equal(selected, expected)


@pytest.mark.parametrize("pool_size", [4, 64])
@pytest.mark.parametrize("given", [1, 37, 150])
def test_greedy_continues_from_given_centres_like_the_textbook_loop(pool_size, given):
    x = blobs(700, 16, seed=4)
    selected = greedy_coreset(x, 150, progress=False, pool_size=pool_size, given=given)
    assert torch.equal(selected, naive_greedy(x, 150, given=given))
    assert torch.equal(selected[:given], torch.arange(given))


def test_given_centres_must_fit_in_the_coreset():
    with pytest.raises(ValueError, match=r"given centres must be in \[0, 10\]"):
        greedy_coreset(torch.rand(50, 4), 10, given=11, progress=False)


def test_float32_selection_has_the_same_radius_as_float64():
    x = blobs(2000, 32, seed=4)
    r64 = coverage_radius(x, greedy_coreset(x, 200, progress=False))
    r32 = coverage_radius(x, greedy_coreset(x.float(), 200, progress=False))
    assert r32 == pytest.approx(r64, rel=1e-3)


def test_greedy_radius_is_within_twice_the_best_of_many_random_subsets():
    # Gonzalez's bound: greedy radius <= 2 x optimal <= 2 x any subset's radius.
    x = blobs(1500, 8, seed=5)
    greedy = coverage_radius(x, greedy_coreset(x, 60, progress=False))
    g = torch.Generator().manual_seed(0)
    best_random = min(coverage_radius(x, torch.randperm(1500, generator=g)[:60]) for _ in range(20))
    assert greedy <= 2 * best_random
    assert greedy < best_random  # and, on clustered data, clearly better than random picks


def test_seed_picks_the_start_and_fixes_the_result():
    x = blobs(300, 4, seed=6)
    a, b = greedy_coreset(x, 30, seed=7, progress=False), greedy_coreset(x, 30, seed=7, progress=False)
    assert torch.equal(a, b)
    assert int(a[0]) == int(torch.randint(300, (1,), generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, greedy_coreset(x, 30, seed=8, progress=False))


def test_edge_sizes():
    x = blobs(50, 3, seed=8)
    assert torch.equal(greedy_coreset(x, 50, progress=False), torch.arange(50))
    assert greedy_coreset(x, 1, progress=False).shape == (1,)
    assert greedy_coreset(x[:1], 1, progress=False).tolist() == [0]
    with pytest.raises(ValueError, match=r"coreset size must be in \[1, 50\], got 0"):
        greedy_coreset(x, 0)
    with pytest.raises(ValueError, match=r"coreset size must be in \[1, 50\], got 51"):
        greedy_coreset(x, 51)


def test_duplicate_points_are_not_a_problem():
    x = torch.cat([blobs(40, 3, seed=9)] * 3)  # every point three times
    selected = greedy_coreset(x, 40, progress=False)
    assert coverage_radius(x, selected) == 0.0  # 40 centres cover the 40 distinct points
    assert len({tuple(row) for row in x[selected].tolist()}) == 40  # never a copy of a chosen point


def test_random_projection_preserves_distances_and_is_seeded():
    x = blobs(400, 152, seed=10).float()
    p = random_projection(x, 128, seed=0)
    assert p.shape == (400, 128) and p.dtype == torch.float32
    # Chunking changes nothing but BLAS rounding.
    torch.testing.assert_close(p, random_projection(x, 128, seed=0, chunk=7), rtol=1e-5, atol=1e-5)
    assert not torch.equal(p, random_projection(x, 128, seed=1))
    ratio = torch.pdist(p) ** 2 / torch.pdist(x) ** 2
    assert abs(float(ratio.mean()) - 1) < 0.05  # unbiased for squared distances
    assert float(ratio.std()) < 0.25  # JL: std ~ sqrt(2 / 128) = 0.125
    assert torch.equal(random_projection(x, 152), x)  # projecting up (or to the same size) is skipped


def test_coverage_radius_matches_cdist():
    x = blobs(300, 5, seed=11)
    idx = torch.tensor([0, 10, 20, 30])
    assert coverage_radius(x, idx) == pytest.approx(float(torch.cdist(x, x[idx]).min(1).values.max()), rel=1e-9)


# --------------------------------------------------------------------------- k-NN
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("chunk", [64, 1 << 24])  # 64: many query blocks *and* many bank blocks
def test_nearest_distances_matches_cdist(k, chunk):
    g = torch.Generator().manual_seed(12)
    queries = torch.randn(130, 20, generator=g, dtype=torch.float64) + 3.0  # offset: norms >> distances
    bank = torch.randn(300, 20, generator=g, dtype=torch.float64) + 3.0
    dist, idx = nearest_distances(queries, bank, k=k, chunk=chunk)
    ref_d, ref_i = torch.cdist(queries, bank).topk(k, dim=1, largest=False)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist, ref_d, rtol=1e-9, atol=1e-9)


def test_nearest_distances_float32_precision_and_zero_distance():
    g = torch.Generator().manual_seed(13)
    bank = torch.randn(500, 152, generator=g) * 0.3 + 5.0  # large offset: the trick's worst case
    queries = torch.cat([bank[:10], bank[10:20] + 0.01])
    dist, idx = nearest_distances(queries, bank)
    assert torch.equal(idx[:10, 0], torch.arange(10))
    assert torch.equal(dist[:10, 0], torch.zeros(10))  # recomputed directly: exact, no sqrt(rounding error)
    torch.testing.assert_close(dist[10:, 0], torch.full((10,), 0.01 * 152 ** 0.5), rtol=1e-3, atol=0)


def test_nearest_distances_rejects_bad_shapes_and_k():
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\] \(the bank size\), got 4"):
        nearest_distances(torch.zeros(2, 5), torch.zeros(3, 5), k=4)
    with pytest.raises(ValueError, match="expected"):
        nearest_distances(torch.zeros(2, 5), torch.zeros(3, 4))


@pytest.mark.parametrize("bank_size", [300, 256, 50])  # a short last block, whole blocks, one short block
def test_exported_search_finds_the_same_neighbours_as_eager_torch(bank_size):
    """Exported graphs find the arg-min in two levels (OpenVINO runs a whole-row ArgMin as a slow
    TopK): same distances and indices as eager torch, including the first column among ties."""
    from anomalens.components.knn import NearestNeighbours

    gen = torch.Generator().manual_seed(3)
    bank = torch.randn(bank_size, 8, generator=gen)
    bank[bank_size - 1] = bank[17]  # a duplicate row in a later block: the tie must resolve to 17
    queries = torch.cat([torch.randn(40, 8, generator=gen), bank[17:18] + 1e-3, bank[-2:-1] - 1e-3])
    eager = NearestNeighbours()(queries, bank)
    program = torch.export.export(NearestNeighbours(), (queries, bank))
    exported = program.module()(queries, bank)
    assert "amin" in program.graph_module.print_readable(print_output=False)  # the export branch ran
    assert torch.equal(exported[1], eager[1]) and exported[1][-2, 0] == 17
    assert exported[1][-1, 0] == bank_size - 2
    torch.testing.assert_close(exported[0], eager[0])
