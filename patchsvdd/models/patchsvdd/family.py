"""Patch SVDD as the shared code uses it (``ModelFamily``): standardised inputs, the two losses' epoch,
the held-out position loss, and maps from nearest training patches of both K (fusions 64, 32, sum, mult)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from patchsvdd.data.images import IMAGE_SIZE
from patchsvdd.data.mvtec import standardise, training_mean
from patchsvdd.models.base import (
    CategoryScores,
    EpochSteps,
    ModelFamily,
    Scoring,
    SiteScorer,
    SiteState,
    count_parameters,
)
from patchsvdd.models.patchsvdd.bank import BankSearch, MemoryBank, grow_banks, memory_banks, subsample_banks
from patchsvdd.models.patchsvdd.network import (
    LARGE_PATCH,
    SMALL_PATCH,
    PatchSVDD,
)
from patchsvdd.models.patchsvdd.options import PatchSVDDOptions
from patchsvdd.models.patchsvdd.scoring import FUSIONS, anomaly_maps, distribute_scores, embed_images
from patchsvdd.models.patchsvdd.training import epoch_steps, heldout_losses
from patchsvdd.settings import TrainSettings


class BankScorer(SiteScorer):
    """A site's maps: each patch's distance to its nearest training patch in the bank of its K, spread over
    the pixels it covers, K=64 and K=32 summed."""

    def __init__(self, model: PatchSVDD, state: SiteState, search: BankSearch = "auto", batch_size: int = 8) -> None:
        if state.mean is None:
            raise ValueError("a Patch SVDD site state needs the training mean")
        self.model, self.mean, self.batch_size = model, state.mean, batch_size
        self.banks = {k: MemoryBank(bank, search) for k, bank in state.banks.items()}
        self.search = self.banks[SMALL_PATCH].search

    @torch.no_grad()
    def maps(self, images: np.ndarray) -> np.ndarray:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(standardise(images[start : start + self.batch_size], self.mean)).to(device)
            emb64, emb32 = self.model.embed(batch)
            fused = torch.zeros(0)
            for k, emb in ((LARGE_PATCH, emb64), (SMALL_PATCH, emb32)):
                n, d, g, _ = emb.shape
                queries = emb.permute(0, 2, 3, 1).reshape(-1, d).float().cpu().numpy()
                scores = self.banks[k].distances(queries).reshape(n, g, g)
                amap = distribute_scores(scores, k, PatchSVDD.strides[k])
                fused = amap if k == LARGE_PATCH else fused + amap
            out.append(fused.numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)


class PatchSVDDFamily(ModelFamily[PatchSVDD]):
    name = "patchsvdd"
    network = PatchSVDD
    fusions = FUSIONS
    train_metrics = ("train_loss", "pos_loss_64", "pos_loss_32", "spread_64", "spread_32")
    architecture_limits = {"emb_dim": (1, 4096)}
    site_heads = ("classifier64.", "classifier32.")  # the position classifiers: scoring uses the encoder only

    def build(self, options: PatchSVDDOptions, *, channels: int = 3) -> PatchSVDD:
        return PatchSVDD(emb_dim=options.emb_dim, init=options.init)  # RGB only: gray is read as three equal channels

    def architecture(self, model: PatchSVDD) -> dict[str, int]:
        return {"emb_dim": int(model.emb_dim)}

    def from_architecture(self, numbers: dict[str, int]) -> PatchSVDD:
        return PatchSVDD(emb_dim=int(numbers["emb_dim"]), init="pytorch")

    def describe(self, model: PatchSVDD) -> str:
        return (
            f"Patch SVDD, D={model.emb_dim}: K=64 at stride {model.strides[64]} (13x13 grid), "
            f"K=32 at stride {model.strides[32]} (57x57 grid), {count_parameters(model):,} parameters"
        )

    def inputs(self, model: PatchSVDD, images: np.ndarray, mean: np.ndarray) -> torch.Tensor:
        """(N,3,H,W) float32: the images less the training ``mean``, over 255 (``data.standardise``)."""
        return torch.from_numpy(standardise(images, mean))

    def epoch_steps(
        self, model: PatchSVDD, inputs: torch.Tensor, recipe: TrainSettings, options: PatchSVDDOptions
    ) -> EpochSteps:
        return epoch_steps(model, inputs, options.lambda_svdd)

    def round_report(self, losses: dict[str, float]) -> dict[str, float]:
        return {
            "train_loss": losses["loss"],
            "pos_loss_64": losses["loss_pos_64"],
            "pos_loss_32": losses["loss_pos_32"],
            "spread_64": losses["spread_64"],
            "spread_32": losses["spread_32"],
        }

    def epoch_line(self, losses: dict[str, float]) -> str:
        return (
            f"loss {losses['loss']:.4f}, position losses K=64 {losses['loss_pos_64']:.3f} K=32 "
            f"{losses['loss_pos_32']:.3f} (chance 2.079), spread {losses['spread_64']:.2g}/{losses['spread_32']:.2g}"
        )

    def heldout(self, model: PatchSVDD, inputs: torch.Tensor) -> float:
        return heldout_losses(model, inputs)[self.heldout_metric]

    def category_maps(
        self, model: PatchSVDD, train_images: np.ndarray, test_images: np.ndarray, scoring: Scoring
    ) -> CategoryScores:
        """Every test patch against every training patch of its K (``scoring.search`` 'exact' or 'fast'), both
        standardised with ``scoring.mean`` (None: the training images' mean)."""
        device = next(model.parameters()).device
        mean = training_mean(train_images) if scoring.mean is None else scoring.mean
        start = time.perf_counter()
        train_emb = embed_images(model, standardise(train_images, mean), scoring.batch_size, scoring.progress)
        test_emb = embed_images(model, standardise(test_images, mean), scoring.batch_size, scoring.progress)
        embed_seconds = time.perf_counter() - start
        scores = anomaly_maps(train_emb, test_emb, mode=scoring.search, device=device)
        scores.seconds = {"embed": embed_seconds, **scores.seconds}
        return scores

    def site_state(
        self, model: PatchSVDD, good_images: np.ndarray, mean: np.ndarray, bank_fraction: float, subsample: str
    ) -> SiteState:
        banks = memory_banks(model.eval(), standardise(good_images, mean), bank_fraction, subsample)
        return SiteState(mean=mean, banks=banks)

    def site_states(
        self,
        model: PatchSVDD,
        good_images: np.ndarray,
        mean: np.ndarray,
        bank_fractions: Sequence[float],
        subsample: str,
    ) -> list[SiteState]:
        embeddings = embed_images(model.eval(), standardise(good_images, mean))  # once for every fraction
        return [SiteState(mean=mean, banks=subsample_banks(embeddings, f, subsample)) for f in bank_fractions]

    def add_good(
        self,
        model: PatchSVDD,
        state: SiteState,
        good_images: np.ndarray,
        n_images: int,
        bank_fraction: float,
        subsample: str,
    ) -> SiteState:
        if state.mean is None:
            raise ValueError("a Patch SVDD site state needs the training mean")
        inputs = standardise(good_images, state.mean)
        kcenter = bank_fraction < 1 and subsample == "kcenter"  # a full bank is one row per patch, in any order
        banks = grow_banks(model.eval(), state.banks, inputs, "kcenter" if kcenter else "append")
        return SiteState(mean=state.mean, banks=banks)

    def state_fields(self, model: PatchSVDD, state: SiteState) -> dict:
        return {"emb_dim": model.emb_dim}

    def read_state(self, model: PatchSVDD, fields: dict, read_array) -> SiteState:
        mean = read_array("mean.npy")
        if mean.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"mean.npy: shape {mean.shape}, expected {(IMAGE_SIZE, IMAGE_SIZE, 3)}")
        banks = {}
        for k in (LARGE_PATCH, SMALL_PATCH):
            bank = read_array(f"bank_{k}.npy")
            if bank.ndim != 2 or bank.shape[1] != model.emb_dim or len(bank) == 0:
                raise ValueError(f"bank_{k}.npy: shape {bank.shape}, expected (rows, {model.emb_dim})")
            banks[k] = bank.astype(np.float32)
        return SiteState(mean=mean.astype(np.float32), banks=banks)

    def site_scorer(self, model: PatchSVDD, state: SiteState, search: BankSearch) -> SiteScorer:
        return BankScorer(model, state, search)
