"""Training: losses, one short epoch that changes every trained part, determinism."""

from __future__ import annotations

import numpy as np
import torch

from patchsvdd.model import PatchSVDD
from patchsvdd.train import make_optimizer, svdd_loss, train_epoch


def _images(n: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(0, 0.2, (n, 3, 256, 256)).astype(np.float32)


def test_svdd_loss_is_mean_l2_distance() -> None:
    a = torch.zeros(2, 4, 1, 1)
    b = torch.tensor([[3.0, 4.0, 0, 0], [0, 0, 0, 1.0]]).reshape(2, 4, 1, 1)
    assert svdd_loss(a, b).item() == 3.0


def test_short_epoch_trains_every_part_and_is_seeded() -> None:
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = PatchSVDD(emb_dim=16)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        losses = train_epoch(model, _images(), make_optimizer(model), repeat=2, batch_size=4, max_steps=2, generator=7, progress=False)
        results.append((losses, model.state_dict()))
        assert losses["steps"] == 2
        assert all(np.isfinite(v) for v in losses.values())
        assert losses["loss_pos_64"] > 1.0  # about ln 8 at the start
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        frozen = {k for k in before if k.endswith("layers.4.weight") and "classifier" in k}  # normalised last layers
        assert changed == set(before) - frozen
    assert results[0][0] == results[1][0]
    for k, v in results[0][1].items():
        assert torch.equal(v, results[1][1][k])


def test_epoch_length_follows_repeat_and_batch() -> None:
    model = PatchSVDD(emb_dim=8)
    losses = train_epoch(model, _images(3), make_optimizer(model), repeat=3, batch_size=4, generator=0, progress=False)
    assert losses["steps"] == 3  # ceil(3 images * 3 / 4)
