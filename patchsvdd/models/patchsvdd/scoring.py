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
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from patchsvdd.models.base import CategoryScores, SearchMode
from patchsvdd.models.patchsvdd.network import LARGE_PATCH, SMALL_PATCH, PatchSVDD

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
def _torch_candidates(
    queries: torch.Tensor, bank: torch.Tensor, device: torch.device, query_chunk: int, bank_chunk: int, k: int
) -> torch.Tensor:
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


PRUNE_MIN_BANK = 100_000  # bank rows from which the exact search on the CPU tries cluster pruning first
PRUNE_MAX_SCANNED = 0.05  # pruning goes on only while it scans at most this share of the bank (else: flat search):
# a row scanned in a cluster costs many times a row of the flat search (docs/benchmarks.md, "Exact search")
FLOAT32_DOT_ERROR = 70 * 2.0**-24  # bound of the relative error of |q|^2 + |c|^2 - 2 q.c in float32 for D <= 64


def _cluster_lists(index) -> tuple[np.ndarray, list[np.ndarray]]:
    """The row ids of each inverted list of a faiss IVF index: (sizes (C,), [ids of list c])."""
    import faiss

    lists = index.invlists
    ids = [faiss.rev_swig_ptr(lists.get_ids(c), lists.list_size(c)).copy() for c in range(index.nlist)]
    return np.array([len(i) for i in ids]), ids


def _pruned_candidates(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    query_chunk: int = 8192,
    probe: int = 3,
    seed: int = 0,
    seconds: dict[str, float] | None = None,
) -> torch.Tensor | None:
    """Indices (Q,k) of the ``k`` nearest rows of ``bank`` (B,D) for each query (Q,D), exactly, scanning for each
    query only the k-means clusters of the bank that can hold a row nearer than its bound; None when that
    would scan more than ``PRUNE_MAX_SCANNED`` of the bank (embeddings spread in all dimensions: the flat
    search is faster then).

    The bound U of a query is the true distance to the best row of its ``probe`` nearest clusters. A cluster c
    of centre m_c and radius r_c (the largest distance of its rows to m_c, in float64) is skipped only when
    |q - m_c| - r_c > U, the query-centre distance taken low by its float32 error bound: by the triangle
    inequality no row in it is nearer than U. Within the clusters scanned, faiss ranks rows by direct float32
    differences (no |q|^2 + |b|^2 - 2 q.b expansion), which the float64 re-ranking then makes exact.
    ``seconds`` (if given) receives the time of the clustering ('clusters') and of the search ('pruned').
    """
    import faiss

    seconds = seconds if seconds is not None else {}
    start = time.perf_counter()
    x = np.ascontiguousarray(bank.numpy(), dtype=np.float32)
    rows, dim = x.shape
    n_clusters = int(min(max(64, 4 * math.sqrt(rows)), rows // 16))
    kmeans = faiss.Kmeans(dim, n_clusters, niter=4, seed=1234 + seed, max_points_per_centroid=32, verbose=False)
    kmeans.train(x)
    quantizer = faiss.IndexFlatL2(dim)
    quantizer.add(kmeans.centroids)  # type: ignore[arg-type]  # set by train()
    index = faiss.IndexIVFFlat(quantizer, dim, n_clusters)
    index.add(x)
    sizes, members = _cluster_lists(index)
    centres = torch.from_numpy(kmeans.centroids)
    cluster_of = torch.empty(rows, dtype=torch.long)
    for c, ids in enumerate(members):
        cluster_of[torch.from_numpy(ids)] = c
    bank64 = bank.double()
    member_distance = (bank64 - centres.double()[cluster_of]).norm(dim=1)
    radius = torch.zeros(n_clusters, dtype=torch.float64).scatter_reduce(0, cluster_of, member_distance, "amax")
    radius = (radius * (1 + 1e-6) + 1e-12).float()  # float64 norms of float32 data, rounded up
    sizes_t = torch.from_numpy(sizes).float()
    centre_sq = centres.pow(2).sum(1)
    centre_norm = centre_sq.sqrt()
    found = torch.empty(queries.shape[0], k, dtype=torch.long)
    scanned = 0.0
    seconds["clusters"] = time.perf_counter() - start
    start = time.perf_counter()
    # a first small chunk decides early whether pruning pays
    starts = [0, *range(min(1024, queries.shape[0]), queries.shape[0], query_chunk)]
    for q0, q1 in zip(starts, [*starts[1:], queries.shape[0]]):
        q = queries[q0:q1]
        q_sq = q.pow(2).sum(1, keepdim=True)
        sq = torch.addmm(q_sq + centre_sq[None], q, centres.T, alpha=-2.0)
        slack = (q_sq.sqrt() + centre_norm[None]).pow_(2).mul_(FLOAT32_DOT_ERROR)
        lower = (sq - slack).clamp_min_(0).sqrt_().mul_(1 - 1e-6).sub_(radius[None])  # no row of cluster c is nearer
        nearest = sq.topk(min(probe, n_clusters), dim=1, largest=False).indices
        index.nprobe = nearest.shape[1]
        # faiss's Python wrapper takes (x, k, assign, centroid_dis) and returns (distances, labels); its stubs
        # give the C++ signature
        first: np.ndarray
        _, first = index.search_preassigned(np.ascontiguousarray(q.numpy()), k, nearest.numpy(), None)  # type: ignore
        first_t = torch.from_numpy(np.asarray(first))
        bound = (q.double()[:, None, :] - bank64[first_t.clamp_min(0)]).norm(dim=2)
        bound = bound.masked_fill(first_t < 0, math.inf).min(dim=1).values
        keep = lower <= bound.float()[:, None] * (1 + 1e-6)
        scanned += float((keep.float() @ sizes_t).sum()) / rows
        if scanned > PRUNE_MAX_SCANNED * q1:
            seconds["pruned"] = time.perf_counter() - start
            return None
        counts = keep.sum(1)
        order = counts.argsort()
        for g0 in range(0, len(order), 512):  # queries of similar counts together: a tight padded list each
            group = order[g0 : g0 + 512]
            group_keep = keep[group]
            width = max(int(counts[group].max()), 1)
            lists = torch.full((len(group), width), -1, dtype=torch.long)
            row, col = group_keep.nonzero(as_tuple=True)
            position = group_keep.long().cumsum(1)[row, col] - 1
            lists[row, position] = col
            index.nprobe = width
            _, ids = index.search_preassigned(np.ascontiguousarray(q[group].numpy()), k, lists.numpy(), None)  # type: ignore
            found[q0 + group] = torch.from_numpy(ids)
    seconds["pruned"] = time.perf_counter() - start
    seconds["scanned_share"] = scanned / max(queries.shape[0], 1)
    return found


def centre_on_bank(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (Q,D) and bank (B,D) less the bank's mean, in float32 (the mean taken in float64).

    Distances do not change, but the expansion |q|^2 + |b|^2 - 2 q.b that BLAS
    and faiss rank by loses its rounding error, which grows with the norms: a
    saturated encoder (embeddings near +-1, neighbours 1e-4 apart) otherwise
    gets wrong neighbours from a float32 "exact" search.
    """
    mean = bank.double().mean(dim=0)
    return (queries.double() - mean).float(), (bank.double() - mean).float()


def rerank(queries: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Distance (Q,) to the nearest of each query's candidates (Q,k) (-1 for none), from direct differences."""
    valid = candidates >= 0
    diff = queries.double()[:, None, :] - bank.double()[candidates.clamp_min(0)]
    dist = diff.norm(dim=2).masked_fill(~valid, math.inf)
    return dist.min(dim=1).values.float()


def _in_chunks(queries: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    return (
        torch.cat(
            [rerank(queries[i : i + chunk], bank, candidates[i : i + chunk]) for i in range(0, queries.shape[0], chunk)]
        )
        if queries.shape[0]
        else torch.zeros(0)
    )


def exact_nearest(
    queries: torch.Tensor,
    bank: torch.Tensor,
    device: torch.device | str = "cpu",
    backend: Literal["auto", "torch", "faiss"] = "auto",
    query_chunk: int = 256,
    bank_chunk: int = 4096,
    seconds: dict[str, float] | None = None,
) -> torch.Tensor:
    """True L2 distance from each query (Q,D) to its nearest row of ``bank`` (B,D): (Q,) on the CPU.

    On embeddings centred on the bank mean (:func:`centre_on_bank`): on the
    CPU, for a bank of ``PRUNE_MIN_BANK`` rows or more, an exact search that
    skips the bank's k-means clusters that cannot hold a nearer row
    (:func:`_pruned_candidates`), else faiss's flat index (brute force); on a
    GPU, chunked torch matrix products ('auto'). The few nearest candidates of each
    query are then re-ranked by distances computed directly in float64, so the
    result is exact whatever the embeddings' offset and scale. ``seconds`` (if
    given) receives the time of each stage: 'centre', 'clusters' and 'pruned'
    (where tried), 'flat' (brute force, where used), 'rerank'.
    """
    seconds = seconds if seconds is not None else {}
    device = torch.device(device)
    if backend == "auto":
        backend = "faiss" if device.type == "cpu" else "torch"
    start = time.perf_counter()
    centred_queries, centred_bank = centre_on_bank(queries, bank)
    seconds["centre"] = time.perf_counter() - start
    k = min(RERANK, bank.shape[0])
    candidates = None
    if backend == "faiss" and bank.shape[0] >= PRUNE_MIN_BANK:
        candidates = _pruned_candidates(centred_queries, centred_bank, k, seconds=seconds)
    start = time.perf_counter()
    if candidates is None and backend == "faiss":
        candidates = _faiss_candidates(centred_queries, centred_bank, k)
        seconds["flat"] = time.perf_counter() - start
    elif candidates is None:
        candidates = _torch_candidates(centred_queries, centred_bank, device, query_chunk, bank_chunk, k)
        seconds["flat"] = time.perf_counter() - start
    start = time.perf_counter()
    distances = _in_chunks(centred_queries, centred_bank, candidates)
    seconds["rerank"] = time.perf_counter() - start
    return distances


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
    train_embeddings: torch.Tensor,
    test_embeddings: torch.Tensor,
    mode: SearchMode = "exact",
    device: torch.device | str = "cpu",
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
