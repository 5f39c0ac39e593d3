"""Inference: dense embeddings, nearest-neighbour patch scores and pixel anomaly maps.

Patch score = L2 distance from a test patch embedding to its nearest neighbour
among all training patch embeddings of the same K. Exact search compares with
every training patch (faiss's blocked flat search on the CPU, chunked torch
matrix products on a GPU); fast search walks a faiss HNSW graph. Maps average
the scores of all patches covering a pixel; fusions add ('sum') or multiply
('mult') the K=64 and K=32 maps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .model import LARGE_PATCH, SMALL_PATCH, PatchSVDD

SearchMode = Literal["exact", "fast"]
FUSIONS = ("64", "32", "sum", "mult")
EXACT_PAIRS_LIMIT = 2e9  # 'fast' searches exactly below this many query x bank pairs (a few seconds of BLAS)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


@torch.no_grad()
def embed_images(
    model: PatchSVDD, images: torch.Tensor | np.ndarray, batch_size: int = 8, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense embeddings of standardised images (N,3,256,256), on the model's device, in batches.

    Returns CPU tensors (emb64 (N,D,13,13), emb32 (N,D,57,57)).
    """
    device = next(model.parameters()).device
    model.eval()
    images = torch.as_tensor(images, dtype=torch.float32)
    emb64, emb32 = [], []
    starts = range(0, images.shape[0], batch_size)
    for start in _progress(starts, len(starts), "embed", progress):
        e64, e32 = model.embed(images[start : start + batch_size].to(device))
        emb64.append(e64.cpu())
        emb32.append(e32.cpu())
    return torch.cat(emb64), torch.cat(emb32)


def flatten_grid(embeddings: torch.Tensor) -> torch.Tensor:
    """(N,D,G,G) -> (N*G*G,D), rows in (image, row, column) order."""
    return embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1]).contiguous()


RERANK = 4  # candidates per query that the exact search re-ranks by direct differences


@torch.no_grad()
def _torch_candidates(queries: torch.Tensor, bank: torch.Tensor, device: torch.device, query_chunk: int, bank_chunk: int,
                      k: int) -> torch.Tensor:
    """Indices (Q,k) of the ``k`` nearest rows of ``bank`` (B,D) for each query (Q,D), by chunked matrix products."""
    bank = bank.to(device, torch.float32)
    bank_sq = bank.pow(2).sum(1)
    found = torch.empty(queries.shape[0], k, dtype=torch.long)
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0 : q0 + query_chunk].to(device, torch.float32)
        best = torch.full((q.shape[0], k), math.inf, device=device)
        best_idx = torch.zeros(q.shape[0], k, dtype=torch.long, device=device)
        for b0 in range(0, bank.shape[0], bank_chunk):
            # |b|^2 - 2 q.b orders the candidates of a query as |q - b|^2 does.
            scores = torch.addmm(bank_sq[None, b0 : b0 + bank_chunk], q, bank[b0 : b0 + bank_chunk].T, alpha=-2.0)
            value, idx = scores.topk(min(k, scores.shape[1]), dim=1, largest=False)
            merged = torch.cat([best, value], dim=1)
            merged_idx = torch.cat([best_idx, idx + b0], dim=1)
            best, order = merged.topk(k, dim=1, largest=False)
            best_idx = merged_idx.gather(1, order)
        found[q0 : q0 + q.shape[0]] = best_idx.cpu()
    return found


def _faiss_candidates(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (Q,k) of the ``k`` nearest rows of ``bank`` for each query, with faiss's blocked exact search (CPU)."""
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank.numpy(), dtype=np.float32))
    _, found = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
    return torch.from_numpy(found.astype(np.int64))


def centre_on_bank(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (Q,D) and bank (B,D) less the bank's mean, in float32 (the mean taken in float64).

    Distances do not change, but the expansion |q|^2 + |b|^2 - 2 q.b that BLAS
    and faiss rank by loses its rounding error, which grows with the norms: a
    saturated encoder (embeddings near +-1, neighbours 1e-4 apart) otherwise
    gets wrong neighbours from a float32 "exact" search.
    """
    mean = bank.double().mean(dim=0)
    return (queries.double() - mean).float(), (bank.double() - mean).float()


def _rerank(queries: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Distance (Q,) to the nearest of each query's candidates (Q,k) (-1 for none), from direct differences."""
    valid = candidates >= 0
    diff = queries.double()[:, None, :] - bank.double()[candidates.clamp_min(0)]
    dist = diff.norm(dim=2).masked_fill(~valid, math.inf)
    return dist.min(dim=1).values.float()


def _in_chunks(queries: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    return torch.cat([_rerank(queries[i : i + chunk], bank, candidates[i : i + chunk])
                      for i in range(0, queries.shape[0], chunk)]) if queries.shape[0] else torch.zeros(0)


def exact_nearest(
    queries: torch.Tensor,
    bank: torch.Tensor,
    device: torch.device | str = "cpu",
    backend: Literal["auto", "torch", "faiss"] = "auto",
    query_chunk: int = 256,
    bank_chunk: int = 4096,
) -> torch.Tensor:
    """True L2 distance from each query (Q,D) to its nearest row of ``bank`` (B,D): (Q,) on the CPU.

    Brute force over every row on embeddings centred on the bank mean
    (:func:`centre_on_bank`): faiss's flat index on the CPU, chunked torch
    matrix products on a GPU ('auto'). The few nearest candidates of each
    query are then re-ranked by distances computed directly in float64, so the
    result is exact whatever the embeddings' offset and scale.
    """
    device = torch.device(device)
    if backend == "auto":
        backend = "faiss" if device.type == "cpu" else "torch"
    centred_queries, centred_bank = centre_on_bank(queries, bank)
    k = min(RERANK, bank.shape[0])
    if backend == "faiss":
        candidates = _faiss_candidates(centred_queries, centred_bank, k)
    else:
        candidates = _torch_candidates(centred_queries, centred_bank, device, query_chunk, bank_chunk, k)
    return _in_chunks(centred_queries, centred_bank, candidates)


def fast_nearest(
    queries: torch.Tensor, bank: torch.Tensor, neighbours: int = 16, build_effort: int = 40, search_effort: int = 64
) -> torch.Tensor:
    """Approximate nearest-neighbour L2 distances (Q,) with a faiss HNSW graph over ``bank`` (B,D).

    A graph index is used rather than k-means lists because patch embeddings
    are very unevenly spread (an untrained encoder's nearly constant), which
    leaves inverted lists badly unbalanced. Embeddings are centred on the bank
    mean first and the few candidates found are re-ranked by direct
    differences, as in :func:`exact_nearest`; the distance returned is the
    true L2 distance to the best candidate found.
    """
    import faiss

    centred_queries, centred_bank = centre_on_bank(queries, bank)
    index = faiss.IndexHNSWFlat(bank.shape[1], neighbours)
    index.hnsw.efConstruction = build_effort
    index.add(np.ascontiguousarray(centred_bank.numpy()))
    index.hnsw.efSearch = search_effort
    _, found = index.search(np.ascontiguousarray(centred_queries.numpy()), min(RERANK, bank.shape[0]))
    candidates = torch.from_numpy(found.astype(np.int64))
    missing = (candidates < 0).all(dim=1)  # no neighbour returned: search those queries exactly
    if missing.any():
        candidates[missing] = _faiss_candidates(centred_queries[missing], centred_bank, candidates.shape[1])
    return _in_chunks(centred_queries, centred_bank, candidates)


def patch_scores(
    train_embeddings: torch.Tensor, test_embeddings: torch.Tensor, mode: SearchMode = "exact", device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Nearest-neighbour distance of every test patch: train (N,D,G,G), test (M,D,G,G) -> (M,G,G).

    'fast' uses the HNSW graph only where exact search would be slow (the K=32
    bank of a full category); smaller searches stay exact.
    """
    bank = flatten_grid(train_embeddings)
    queries = flatten_grid(test_embeddings)
    if mode == "exact" or (mode == "fast" and queries.shape[0] * bank.shape[0] <= EXACT_PAIRS_LIMIT):
        dist = exact_nearest(queries, bank, device=device)
    elif mode == "fast":
        dist = fast_nearest(queries, bank)
    else:
        raise ValueError(f"search mode {mode!r}: choose 'exact' or 'fast'")
    m, _, g, h = test_embeddings.shape
    return dist.reshape(m, g, h)


def distribute_scores(scores: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Pixel map where each pixel is the mean score of the patches covering it.

    scores (M,G,G) on a grid of K x K patches at stride S -> (M,H,W), H = (G-1)*S + K.
    A transposed convolution with a K x K kernel of ones sums the covering
    scores; the same on a grid of ones counts them.
    """
    grid = scores[:, None].float()
    kernel = torch.ones(1, 1, patch_size, patch_size, dtype=grid.dtype, device=grid.device)
    summed = F.conv_transpose2d(grid, kernel, stride=stride)
    counts = F.conv_transpose2d(torch.ones_like(grid[:1]), kernel, stride=stride)
    return (summed / counts)[:, 0]


@dataclass
class CategoryScores:
    """Anomaly maps (M,H,W) for each fusion in ``FUSIONS`` and the search timings in seconds."""

    maps: dict[str, torch.Tensor]
    seconds: dict[str, float]

    def image_scores(self, fusion: str) -> torch.Tensor:
        """Image score = maximum of the map: (M,)."""
        return self.maps[fusion].flatten(1).amax(dim=1)


def anomaly_maps(
    train_embeddings: tuple[torch.Tensor, torch.Tensor],
    test_embeddings: tuple[torch.Tensor, torch.Tensor],
    mode: SearchMode = "exact",
    device: torch.device | str = "cpu",
) -> CategoryScores:
    """Maps for both K and their fusions from (emb64, emb32) of the training and test images."""
    maps: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    for k, train_emb, test_emb in zip((LARGE_PATCH, SMALL_PATCH), train_embeddings, test_embeddings):
        start = time.perf_counter()
        scores = patch_scores(train_emb, test_emb, mode=mode, device=device)
        seconds[f"search_{k}"] = time.perf_counter() - start
        maps[str(k)] = distribute_scores(scores, k, PatchSVDD.strides[k])
    maps["sum"] = maps["64"] + maps["32"]
    maps["mult"] = maps["64"] * maps["32"]
    return CategoryScores(maps=maps, seconds=seconds)
