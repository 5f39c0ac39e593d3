"""Patch SVDD's memory banks: a site's training patch embeddings (all, or a covering subsample) and the
nearest-neighbour index an inspector searches them with."""

from __future__ import annotations

import numpy as np
import torch

from patchsvdd.models.base import BankSearch
from patchsvdd.models.patchsvdd.network import LARGE_PATCH, SMALL_PATCH, PatchSVDD
from patchsvdd.models.patchsvdd.scoring import RERANK, embed_images, flatten_grid, rerank

FAST_BANK_ROWS = 20_000  # 'auto': banks larger than this are searched with an HNSW graph

SUBSAMPLES = ("kcenter", "random")


def _greedy_cover(patches: torch.Tensor, chosen: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy k-center at each position of ``patches`` (P,N,D): from the columns already ``chosen`` (P,c),
    add the patch farthest from all chosen so far until ``keep`` are chosen; returns (P,keep)."""
    rows = torch.arange(patches.shape[0])
    nearest = torch.full(patches.shape[:2], float("inf"))  # (P,N) distance to the chosen set
    for j in range(chosen.shape[1]):
        nearest = torch.minimum(nearest, (patches - patches[rows, chosen[:, j]][:, None]).norm(dim=2))
    picked = [chosen]
    for _ in range(chosen.shape[1], keep):
        column = nearest.argmax(dim=1)
        picked.append(column[:, None])
        nearest = torch.minimum(nearest, (patches - patches[rows, column][:, None]).norm(dim=2))
    return torch.cat(picked, dim=1)


@torch.no_grad()
def kcenter_per_position(embeddings: torch.Tensor, keep: int) -> torch.Tensor:
    """A covering subsample of a grid of patch embeddings (N,D,H,W) -> (H*W*keep, D).

    At each of the H*W grid positions, greedy k-center over the N images'
    patches there: start from the patch farthest from their mean, then add the
    patch farthest from all chosen so far, ``keep`` times. Near-duplicates (the
    many ordinary patches) are dropped first and unusual good patches kept,
    which a random subsample does the other way round.
    """
    n, d, h, w = embeddings.shape
    keep = min(max(1, keep), n)
    patches = embeddings.permute(2, 3, 0, 1).reshape(h * w, n, d).float()  # (P,N,D)
    first = (patches - patches.mean(dim=1, keepdim=True)).norm(dim=2).argmax(dim=1)
    chosen = _greedy_cover(patches, first[:, None], keep)
    return patches[torch.arange(h * w)[:, None], chosen].reshape(-1, d)


def rows_per_position(n_images: int, fraction: float) -> int:
    """How many patches a k-center bank keeps at each grid position for ``n_images`` good images."""
    return min(max(1, round(fraction * n_images)), n_images)


def memory_banks(
    model: PatchSVDD, images: np.ndarray, fraction: float = 1.0, subsample: str = "kcenter", seed: int = 0
) -> dict[int, np.ndarray]:
    """Patch embeddings of standardised training images (N,3,H,W) for both K, flattened to (P,D); with
    ``fraction`` < 1 only about that share of the rows: 'kcenter' (``kcenter_per_position``, the default)
    or 'random' (rows drawn with ``seed``)."""
    return subsample_banks(embed_images(model, images), fraction, subsample, seed)


def subsample_banks(
    embeddings: tuple[torch.Tensor, torch.Tensor], fraction: float = 1.0, subsample: str = "kcenter", seed: int = 0
) -> dict[int, np.ndarray]:
    """``memory_banks`` from embeddings already made: (emb64 (N,D,13,13), emb32 (N,D,57,57))."""
    if not 0 < fraction <= 1:
        raise ValueError(f"bank fraction {fraction}: must be in (0, 1]")
    if subsample not in SUBSAMPLES:
        raise ValueError(f"subsample {subsample!r}: choose {' or '.join(SUBSAMPLES)}")
    rng = np.random.default_rng(seed)
    banks = {}
    for k, emb in zip((LARGE_PATCH, SMALL_PATCH), embeddings):
        if fraction == 1:
            rows = flatten_grid(emb).numpy()
        elif subsample == "kcenter":
            rows = kcenter_per_position(emb, rows_per_position(emb.shape[0], fraction)).numpy()
        else:
            rows = flatten_grid(emb).numpy()
            rows = rows[np.sort(rng.choice(len(rows), size=max(1, round(fraction * len(rows))), replace=False))]
        banks[k] = np.ascontiguousarray(rows, dtype=np.float32)
    return banks


@torch.no_grad()
def grow_banks(
    model: PatchSVDD, banks: dict[int, np.ndarray], images: np.ndarray, subsample: str
) -> dict[int, np.ndarray]:
    """``banks`` {K: (P,D)} with every patch of more good images (M,3,H,W) (standardised) added and none
    of theirs dropped: each new image then finds itself in the bank, and no other image's score can rise.

    A full or 'random' bank gets the new rows at its end; a 'kcenter' bank, laid out position by position
    (``keep`` rows for each of the G*G grid positions), gets the new images' patches at their positions, so
    it stays a per-position bank with ``keep + M`` rows each. (Choosing again among old and new rows to keep
    ``rows_per_position`` of them drops old rows, and on bottle that turned a good image into a false alarm.)
    """
    emb64, emb32 = embed_images(model, images)
    m = len(images)
    grown = {}
    for k, emb in ((LARGE_PATCH, emb64), (SMALL_PATCH, emb32)):
        old = torch.from_numpy(np.asarray(banks[k], dtype=np.float32))
        _, d, g, _ = emb.shape
        if subsample == "kcenter":
            positions = g * g
            if len(old) % positions:
                raise ValueError(f"bank_{k}: {len(old)} rows is not a whole number per grid position ({positions})")
            new_grid = emb.permute(2, 3, 0, 1).reshape(positions, m, d).float()
            rows = torch.cat([old.reshape(positions, -1, d), new_grid], dim=1).reshape(-1, d)
        else:
            rows = torch.cat([old, flatten_grid(emb).float()])
        grown[k] = np.ascontiguousarray(rows.numpy(), dtype=np.float32)
    return grown


class MemoryBank:
    """Training patch embeddings (P,D) of one K with a faiss index built once; ``distances`` answers queries.

    Embeddings are centred on the bank mean and the candidates re-ranked by
    direct differences, as in ``scoring.exact_nearest``: exact with ``exact``,
    an HNSW graph (M=16, efSearch 64) with ``fast``.
    """

    def __init__(self, bank: np.ndarray, search: BankSearch = "auto") -> None:
        import faiss

        self.mean = bank.astype(np.float64).mean(axis=0)
        self.bank = torch.from_numpy((bank - self.mean).astype(np.float32))
        fast = search == "fast" or (search == "auto" and len(bank) > FAST_BANK_ROWS)
        dim = bank.shape[1]
        self.index: faiss.Index
        if fast:
            graph = faiss.IndexHNSWFlat(dim, 16)
            graph.hnsw.efConstruction = 40
            graph.add(np.ascontiguousarray(self.bank.numpy()))
            graph.hnsw.efSearch = 64
            self.index = graph
        else:
            self.index = faiss.IndexFlatL2(dim)
            self.index.add(np.ascontiguousarray(self.bank.numpy()))
        self.search = "fast" if fast else "exact"

    def distances(self, queries: np.ndarray) -> torch.Tensor:
        """L2 distance (Q,) from each query (Q,D) to its nearest bank row (as found by the index)."""
        centred = torch.from_numpy((queries.astype(np.float64) - self.mean).astype(np.float32))
        _, found = self.index.search(np.ascontiguousarray(centred.numpy()), min(RERANK, len(self.bank)))
        return rerank(centred, self.bank, torch.from_numpy(found.astype(np.int64)))
