"""Training: losses, one short epoch that changes every trained part, determinism."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from patchsvdd.device import bf16_support
from patchsvdd.models.patchsvdd.network import PatchSVDD, initialise
from patchsvdd.models.patchsvdd.sampling import crop_patches, sample_position_pairs, sample_svdd_pairs
from patchsvdd.models.patchsvdd.training import (
    CollapseError,
    batch_embeddings,
    batch_losses,
    heldout_losses,
    sample_batch,
    svdd_loss,
)
from patchsvdd.settings import LRSchedule
from patchsvdd.training.loop import as_generator, make_optimizer, resolve_precision, train_epoch


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
        losses = train_epoch(
            model,
            _images(),
            make_optimizer(model),
            repeat=2,
            batch_size=4,
            max_steps=2,
            generator=7,
            precision="fp32",
            progress=False,
        )
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
    losses = train_epoch(
        model, _images(3), make_optimizer(model), repeat=3, batch_size=4, generator=0, precision="fp32", progress=False
    )
    assert losses["steps"] == 3  # ceil(3 images * 3 / 4)


def _batch(emb_dim: int = 16, pairs: int = 3):
    torch.manual_seed(1)
    images = torch.as_tensor(_images(2))
    return PatchSVDD(emb_dim=emb_dim), sample_batch(images, torch.tensor([0, 1, 1][:pairs]), as_generator(5))


def float32_bound(model: torch.nn.Module) -> float:
    """float32's epsilon times the products summed along the network's deepest path (each convolution's and linear
    layer's fan-in): how far two float32 evaluations in different orders may drift for activations of order 1."""
    terms = sum(m.weight[0].numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    return torch.finfo(torch.float32).eps * terms


def test_fused_pass_equals_each_encoder_on_its_own() -> None:
    """Both the fused pass and each encoder on its own agree with a float64 recomputation within float32's bound
    (tanh outputs: of order 1), on any CPU's kernels; the embeddings spread far more than that bound, so a pass
    that mixed up patches or quadrants would fail."""
    model, batch = _batch()
    bound = float32_bound(model)
    fused = batch_embeddings(model, batch, chunk=5)  # chunks that cut through the quadrants of a patch
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        exact = {
            64: reference.encoder(batch.patches[64].double()),
            32: reference.encoder.small(batch.patches[32].double()),
        }
        separate = {64: model.encoder(batch.patches[64]), 32: model.encoder.small(batch.patches[32])}
    for k in (64, 32):
        assert float(exact[k].std()) > 20 * bound
        torch.testing.assert_close(fused[k].detach().double(), exact[k], rtol=0, atol=bound)
        torch.testing.assert_close(separate[k].double(), exact[k], rtol=0, atol=bound)


def test_batch_layout_and_perturbation() -> None:
    _, batch = _batch()
    images = torch.as_tensor(_images(2))
    index = torch.tensor([0, 1, 1])
    gen = as_generator(5)  # the draws of sample_batch for K=64, in its order
    pos = sample_position_pairs(3, 256, 64, gen)
    svdd = sample_svdd_pairs(3, 256, 64, gen)
    for k in (64, 32):
        assert batch.patches[k].shape == (12, 3, k, k)
        assert batch.labels[k].shape == (3,) and int(batch.labels[k].max()) < 8
    assert torch.equal(batch.labels[64], pos.labels)
    # SVDD pairs are cropped as they are (as in the original code); position pairs get colour shift and noise
    assert torch.equal(batch.patches[64][6:9], crop_patches(images, index, svdd.y1, svdd.x1, 64))
    assert torch.equal(batch.patches[64][9:12], crop_patches(images, index, svdd.y2, svdd.x2, 64))
    noise = batch.patches[64][0:3] - crop_patches(images, index, pos.y1, pos.x1, 64)
    assert 0.015 < float(noise.std()) < 0.05


def test_bf16_losses_agree_with_fp32() -> None:
    model, batch = _batch(emb_dim=64)
    with torch.no_grad():
        exact = batch_losses(model, batch, 1e-3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeddings = batch_embeddings(model, batch)
        low = batch_losses(model, batch, 1e-3, embeddings)
    for name in ("loss_pos_64", "loss_pos_32"):
        assert abs(float(low[name]) - float(exact[name])) < 0.02 * float(exact[name])


def test_schedule_warms_up_then_decays() -> None:
    schedule = LRSchedule(base_lr=1e-3, warmup_steps=10, total_steps=110, final_fraction=0.1)
    assert schedule.lr_at(0) == pytest.approx(1e-4)
    assert schedule.lr_at(9) == pytest.approx(1e-3)
    assert schedule.lr_at(10) == pytest.approx(1e-3)
    assert schedule.lr_at(60) == pytest.approx(0.55e-3)
    assert schedule.lr_at(110) == pytest.approx(1e-4) and schedule.lr_at(500) == pytest.approx(1e-4)
    assert LRSchedule(base_lr=2e-4).lr_at(1000) == 2e-4


def test_train_epoch_follows_the_schedule_and_reports_spread() -> None:
    model = PatchSVDD(emb_dim=8)
    optimizer = make_optimizer(model)
    seen = []
    losses = train_epoch(
        model,
        _images(2),
        optimizer,
        repeat=4,
        batch_size=2,
        max_steps=3,
        generator=0,
        precision="fp32",
        progress=False,
        schedule=LRSchedule(base_lr=1e-3, warmup_steps=4),
        start_step=1,
        on_step=lambda step, values: seen.append((step, optimizer.param_groups[0]["lr"], values)),
    )
    assert [(s, round(lr, 8)) for s, lr, _ in seen] == [(1, 5e-4), (2, 7.5e-4), (3, 1e-3)]
    assert losses["spread_64"] > 1e-3 and losses["spread_32"] > 1e-3


def test_kaiming_init_spreads_the_embeddings_where_pytorch_init_does_not() -> None:
    images = torch.as_tensor(_images(1))
    spreads = {}
    for init in ("kaiming", "pytorch"):
        torch.manual_seed(0)
        with torch.no_grad():
            emb64, emb32 = PatchSVDD(init=init).embed(images)
        spreads[init] = float(emb32.std(dim=(0, 2, 3)).mean())
    assert spreads["kaiming"] > 1e-2 > 1e-3 > spreads["pytorch"]
    with pytest.raises(ValueError, match="init 'xavier'"):
        initialise(PatchSVDD(emb_dim=8), "xavier")


def test_collapse_stops_training_with_a_message() -> None:
    model = PatchSVDD(emb_dim=8)
    with torch.no_grad():  # saturate the last tanh: every patch gets the same embedding
        model.encoder.small.layers[-2].bias.fill_(50.0)
        model.encoder.project.bias.fill_(50.0)
    with pytest.raises(CollapseError, match="collapsed at step 1[0-9].*Lower the learning rate"):
        train_epoch(
            model,
            _images(2),
            make_optimizer(model),
            repeat=40,
            batch_size=2,
            generator=0,
            precision="fp32",
            progress=False,
        )


def test_heldout_losses_are_fixed_for_a_model_and_follow_it() -> None:
    torch.manual_seed(0)
    model = PatchSVDD(emb_dim=8)
    images = _images(2)
    first = heldout_losses(model, images, pairs=6, batch_size=4)
    assert heldout_losses(model, images, pairs=6, batch_size=4) == first
    assert first["heldout_pos"] == pytest.approx(first["loss_pos_64"] + first["loss_pos_32"])
    train_epoch(
        model,
        images,
        make_optimizer(model, 1e-3),
        repeat=4,
        batch_size=2,
        max_steps=2,
        generator=0,
        precision="fp32",
        progress=False,
    )
    assert heldout_losses(model, images, pairs=6, batch_size=4) != first
    assert model.training  # its mode is left as it was


def test_precision_names() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if bf16_support(cpu).native else None)
    with pytest.raises(ValueError, match="precision 'fp16'"):
        resolve_precision("fp16", cpu)
