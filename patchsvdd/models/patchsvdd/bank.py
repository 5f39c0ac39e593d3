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
    rows = torch.arange(h * w)
    chosen = torch.empty(h * w, keep, dtype=torch.long)
    chosen[:, 0] = (patches - patches.mean(dim=1, keepdim=True)).norm(dim=2).argmax(dim=1)
    nearest = (patches - patches[rows, chosen[:, 0]][:, None]).norm(dim=2)  # (P,N) distance to the chosen set
    for j in range(1, keep):
        chosen[:, j] = nearest.argmax(dim=1)
        nearest = torch.minimum(nearest, (patches - patches[rows, chosen[:, j]][:, None]).norm(dim=2))
    return patches[rows[:, None], chosen].reshape(-1, d)


def memory_banks(
    model: PatchSVDD, images: np.ndarray, fraction: float = 1.0, subsample: str = "kcenter", seed: int = 0
) -> dict[int, np.ndarray]:
    """Patch embeddings of standardised training images (N,3,H,W) for both K, flattened to (P,D); with
    ``fraction`` < 1 only about that share of the rows: 'kcenter' (``kcenter_per_position``, the default)
    or 'random' (rows drawn with ``seed``)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"bank fraction {fraction}: must be in (0, 1]")
    if subsample not in SUBSAMPLES:
        raise ValueError(f"subsample {subsample!r}: choose {' or '.join(SUBSAMPLES)}")
    emb64, emb32 = embed_images(model, images)
    rng = np.random.default_rng(seed)
    banks = {}
    for k, emb in ((LARGE_PATCH, emb64), (SMALL_PATCH, emb32)):
        if fraction == 1:
            rows = flatten_grid(emb).numpy()
        elif subsample == "kcenter":
            rows = kcenter_per_position(emb, round(fraction * emb.shape[0])).numpy()
        else:
            rows = flatten_grid(emb).numpy()
            rows = rows[np.sort(rng.choice(len(rows), size=max(1, round(fraction * len(rows))), replace=False))]
        banks[k] = np.ascontiguousarray(rows, dtype=np.float32)
    return banks


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
