"""Nearest-neighbour search, overlap-averaged maps and fusions."""

from __future__ import annotations

import pytest
import torch

from patchsvdd.models.patchsvdd import scoring
from patchsvdd.models.patchsvdd.scoring import (
    anomaly_maps,
    distribute_scores,
    exact_nearest,
    fast_nearest,
    flatten_grid,
    patch_scores,
)


def _clustered(n: int, dim: int, centres: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, dim, generator=gen)
    return c[torch.randint(0, centres, (n,), generator=gen)] + 0.3 * torch.randn(n, dim, generator=gen)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exact_search_returns_true_nearest_distances(backend: str) -> None:
    bank = _clustered(5000, 16, 20, 0)
    queries = _clustered(700, 16, 20, 1)
    expected = torch.cdist(queries.double(), bank.double()).min(dim=1).values.float()
    got = exact_nearest(queries, bank, backend=backend, query_chunk=128, bank_chunk=1000)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(exact_nearest(bank[:50], bank, backend=backend), torch.zeros(50))


def _saturated(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like a saturated encoder's embeddings: a common offset near +-1 per dimension plus variations of about
    1e-3 along a 2-dimensional surface, so nearest neighbours are 1e-5 apart. Returns (points (n,64), offset)."""
    fixed = torch.Generator().manual_seed(5)
    offset = torch.where(torch.rand(64, generator=fixed) < 0.5, -0.95, 0.95).double()
    mixing = torch.randn(2, 64, generator=fixed, dtype=torch.float64)
    latent = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (offset + 1e-3 * torch.tanh(latent @ mixing)).float(), offset


def _saturated_and_spread(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bank, queries, offset)."""
    if kind == "saturated":
        # 2000 queries: enough for faiss to rank by the matrix-product expansion, which fails here in float32
        (bank, offset), (queries, _) = _saturated(10000, 0), _saturated(2000, 1)
        return bank, queries, offset
    return _clustered(10000, 64, 30, 0), _clustered(2000, 64, 30, 1), torch.zeros(64, dtype=torch.float64)


def _float64_truth(queries: torch.Tensor, bank: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Brute-force nearest distances in float64; the offset comes off first (exactly, in float64), so that
    cdist's own |q|^2 + |b|^2 - 2 q.b keeps its precision."""
    return torch.cdist(queries.double() - offset, bank.double() - offset).min(dim=1).values


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("kind", ["saturated", "spread"])
def test_exact_search_matches_float64_brute_force(backend: str, kind: str) -> None:
    bank, queries, offset = _saturated_and_spread(kind)
    truth = _float64_truth(queries, bank, offset)
    got = exact_nearest(queries, bank, backend=backend, query_chunk=300, bank_chunk=2500)
    assert float(((got.double() - truth).abs() / truth).max()) < 1e-3


@pytest.mark.parametrize("kind", ["saturated", "spread"])
def test_fast_search_is_as_good_with_an_offset_as_without(kind: str) -> None:
    """The graph search is approximate, but a common offset must not make it worse: its candidates are ranked
    on centred embeddings and re-ranked by direct differences."""
    bank, queries, offset = _saturated_and_spread(kind)
    truth = _float64_truth(queries, bank, offset)
    got = fast_nearest(queries, bank).double()
    without_offset = fast_nearest((queries.double() - offset).float(), (bank.double() - offset).float()).double()
    assert (got >= truth * (1 - 1e-3)).all()  # a true distance to some bank row
    assert float(((got - without_offset).abs() / truth).max()) < 1e-3


def _manifold(n: int, seed: int) -> torch.Tensor:
    """Points on a curved 4-dimensional surface in 32 dimensions, like patch embeddings (tanh outputs)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(4, 32, generator=torch.Generator().manual_seed(99))
    latent = torch.rand(n, 4, generator=gen) * 2 - 1
    return torch.tanh(latent @ mixing) + 0.01 * torch.randn(n, 32, generator=gen)


def test_fast_search_is_close_to_exact_and_never_below_it() -> None:
    bank = _manifold(40000, 2)
    queries = _manifold(2000, 3)
    exact = exact_nearest(queries, bank)
    fast = fast_nearest(queries, bank)
    assert (fast >= exact - 1e-5).all()  # a real distance to some bank row
    assert (fast - exact).abs().le(1e-5).float().mean() > 0.9  # nearly all neighbours are the true ones
    assert ((fast - exact) / exact).mean() < 0.01  # the others are almost as near


def test_patch_scores_layout() -> None:
    train = torch.randn(2, 8, 3, 3)
    test = train[1:].clone()
    test[0, :, 2, 1] += 5.0
    scores = patch_scores(train, test)
    assert scores.shape == (1, 3, 3)
    assert scores[0, 2, 1] > 1.0 and scores.flatten()[[0, 1, 2, 3, 4, 5, 6, 8]].abs().max() < 1e-5
    assert flatten_grid(train)[3 * 3 + 2 * 3 + 1].tolist() == train[1, :, 2, 1].tolist()


@pytest.mark.parametrize("patch_size,stride,grid", [(64, 16, 13), (32, 4, 57), (5, 2, 4)])
def test_distribute_scores_equals_naive_average(patch_size: int, stride: int, grid: int) -> None:
    scores = torch.rand(2, grid, grid)
    side = (grid - 1) * stride + patch_size
    total = torch.zeros(2, side, side)
    count = torch.zeros(side, side)
    for i in range(grid):
        for j in range(grid):
            total[:, i * stride : i * stride + patch_size, j * stride : j * stride + patch_size] += scores[
                :, i, j, None, None
            ]
            count[i * stride : i * stride + patch_size, j * stride : j * stride + patch_size] += 1
    assert torch.allclose(distribute_scores(scores, patch_size, stride), total / count, atol=1e-5)


def test_anomaly_maps_fuse_both_patch_sizes() -> None:
    train = (torch.randn(2, 4, 13, 13), torch.randn(2, 4, 57, 57))
    test = (torch.randn(3, 4, 13, 13), torch.randn(3, 4, 57, 57))
    result = anomaly_maps(train, test, mode="exact")
    assert set(result.maps) == {"64", "32", "sum", "mult"}
    assert all(m.shape == (3, 256, 256) for m in result.maps.values())
    assert torch.allclose(result.maps["sum"], result.maps["64"] + result.maps["32"])
    assert torch.allclose(result.maps["mult"], result.maps["64"] * result.maps["32"])
    assert torch.equal(result.image_scores("32"), result.maps["32"].flatten(1).amax(1))
    with pytest.raises(ValueError, match="search mode"):
        patch_scores(train[0], test[0], mode="nearest")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["saturated", "spread"])
def test_exact_search_with_cluster_pruning_matches_float64_brute_force(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clusters that cannot hold a nearer row are skipped (saturated, low-dimensional embeddings); where most
    of the bank would be scanned (spread in all 64 dimensions) the search falls back to brute force. Either
    way every distance is within 1e-3 of float64 brute force."""
    monkeypatch.setattr(scoring, "PRUNE_MIN_BANK", 5000)
    bank, queries, offset = _saturated_and_spread(kind)
    truth = _float64_truth(queries, bank, offset)
    seconds: dict[str, float] = {}
    got = exact_nearest(queries, bank, seconds=seconds)
    assert float(((got.double() - truth).abs() / truth).max()) < 1e-3
    assert ("flat" in seconds) == (kind == "spread")  # pruned where it pays, flat where it does not
    if kind == "saturated":
        assert seconds["scanned_share"] < scoring.PRUNE_MAX_SCANNED


def test_pruning_keeps_queries_whose_neighbour_sits_in_a_far_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """A query far from every cluster centre but next to one outlying bank row must still find that row."""
    monkeypatch.setattr(scoring, "PRUNE_MIN_BANK", 5000)
    bank, queries, offset = _saturated_and_spread("saturated")
    outlier = bank[0] + 0.01  # a lone row far off the surface
    bank = torch.cat([bank, outlier[None]])
    queries = torch.cat([queries, (outlier + 1e-6)[None]])
    truth = _float64_truth(queries, bank, offset)
    got = exact_nearest(queries, bank)
    assert float(((got.double() - truth).abs() / truth).max()) < 1e-3
