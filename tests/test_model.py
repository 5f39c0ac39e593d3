"""The networks against the brief: layers, shapes, dense equals patch-by-patch, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from patchsvdd.models.patchsvdd.network import NormalizedLinear, PatchSVDD
from patchsvdd.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def model() -> PatchSVDD:
    torch.manual_seed(0)
    return PatchSVDD(emb_dim=64).eval()


def test_small_encoder_layers_follow_the_brief(model: PatchSVDD) -> None:
    convs = [m for m in model.encoder.small.modules() if isinstance(m, nn.Conv2d)]
    assert [c.in_channels for c in convs] + [convs[-1].out_channels] == [3, 32, 64, 128, 128, 64, 32, 32, 64]
    assert all(c.kernel_size == (3, 3) and c.padding == (0, 0) for c in convs)
    assert [c.stride for c in convs] == [(2, 2)] + [(1, 1)] * 7
    acts = [m for m in model.encoder.small.layers if not isinstance(m, nn.Conv2d)]
    assert all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.1 for a in acts[:-1])
    assert isinstance(acts[-1], nn.Tanh)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) for m in model.modules())


def test_hierarchical_head_and_classifiers(model: PatchSVDD) -> None:
    assert model.encoder.combine.kernel_size == (2, 2)
    assert (model.encoder.combine.in_channels, model.encoder.combine.out_channels) == (64, 128)
    assert model.encoder.project.kernel_size == (1, 1)
    assert (model.encoder.project.in_channels, model.encoder.project.out_channels) == (128, 64)
    for clf in (model.classifier64, model.classifier32):
        linears = [m for m in clf.modules() if isinstance(m, nn.Linear)]
        assert [(layer.in_features, layer.out_features) for layer in linears] == [(64, 128), (128, 128), (128, 8)]
        assert isinstance(linears[-1], NormalizedLinear)
        assert all(a.negative_slope == 0.1 for a in clf.modules() if isinstance(a, nn.LeakyReLU))
    assert model.strides == {64: 16, 32: 4}


def test_encoder_output_shapes(model: PatchSVDD) -> None:
    with torch.no_grad():
        assert model.encoder(torch.randn(5, 3, 64, 64)).shape == (5, 64, 1, 1)
        assert model.encoder.small(torch.randn(5, 3, 32, 32)).shape == (5, 64, 1, 1)
        emb64, emb32 = model.embed(torch.randn(2, 3, 256, 256))
    assert emb64.shape == (2, 64, 13, 13)
    assert emb32.shape == (2, 64, 57, 57)
    with pytest.raises(ValueError, match="64x64"):
        model.encoder(torch.randn(1, 3, 32, 32))


def test_dense_embedding_equals_patch_by_patch(model: PatchSVDD) -> None:
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        emb64, emb32 = model.embed(image)
        p32 = image.unfold(2, 32, 4).unfold(3, 32, 4)  # (1,3,57,57,32,32)
        p32 = p32.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 32, 32)
        per_patch32 = model.encoder.small(p32).reshape(57, 57, 64).permute(2, 0, 1)
        p64 = image.unfold(2, 64, 16).unfold(3, 64, 16).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 64, 64)
        per_patch64 = model.encoder(p64).reshape(13, 13, 64).permute(2, 0, 1)
    assert torch.allclose(emb32[0], per_patch32, atol=1e-4)
    assert torch.allclose(emb64[0], per_patch64, atol=1e-4)


def test_normalized_last_layer_gets_no_weight_gradient() -> None:
    layer = NormalizedLinear(128, 8)
    layer(torch.randn(4, 128)).sum().backward()
    assert layer.weight.grad is None
    assert layer.bias.grad is not None


def test_checkpoint_round_trip_loads_weights_only(model: PatchSVDD, tmp_path) -> None:
    path = save_checkpoint(model, tmp_path / "sub" / "m.pt", category="bottle", rounds=3, history=[{"loss": 1.5}])
    raw = torch.load(path, weights_only=True)
    assert raw["emb_dim"] == 64
    loaded, meta = load_checkpoint(path)
    assert meta == {"category": "bottle", "rounds": 3, "history": [{"loss": 1.5}]}
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob("sub/.*tmp"))  # no temporary file left behind


def test_checkpoint_errors_name_the_file(model: PatchSVDD, tmp_path) -> None:
    with pytest.raises(TypeError, match="metadata 'when'"):
        save_checkpoint(model, tmp_path / "m.pt", when=object())
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(broken)
