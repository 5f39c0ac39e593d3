"""The remedies for sites that differ: FedProx's proximal term and each site's own heads, in the
envoys' training task itself (``federated.openfl.tasks.train_task``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from patchsvdd import federated as fed
from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.federated.openfl.tasks import SiteError, proximal_term, restore_site_heads, train_task
from patchsvdd.models.registry import build_model
from patchsvdd.settings import SettingsError, checked_settings
from patchsvdd.training.loop import make_optimizer

SETTINGS = fed.ExperimentSettings(
    rounds=2,
    repeat=4,
    max_steps=3,
    batch_size=4,
    model_options={"emb_dim": 8},
    warmup_steps=0,
    precision="fp32",
    holdout_fraction=0.0,
)


@pytest.fixture(scope="module")
def site(tiny_root):
    return load_category(index_category(tiny_root, "fabric"))


def fresh(settings: fed.ExperimentSettings = SETTINGS) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(settings.model, **settings.model_options)


def flat(model: torch.nn.Module, prefix: str = "") -> torch.Tensor:
    return torch.cat([v.flatten().float() for k, v in model.state_dict().items() if k.startswith(prefix)])


def test_the_proximal_term_is_zero_at_the_rounds_start_and_half_mu_times_the_squared_move_after() -> None:
    model = fresh()
    term = proximal_term(model, mu=0.5)
    assert term().item() == 0.0
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    moved = next(model.parameters()).numel() * 0.01
    assert term().item() == pytest.approx(0.25 * moved, rel=1e-4)
    assert term().requires_grad  # it pulls the weights back through the optimizer


def test_fedprox_keeps_a_round_nearer_its_start(site) -> None:
    moves = {}
    for mu in (0.0, 50.0):
        model, start = fresh(), flat(fresh())
        settings = replace(SETTINGS, proximal_mu=mu)
        train_task(model, site, make_optimizer(model, settings.lr), "cpu", 0, settings)
        moves[mu] = (flat(model) - start).norm().item()
    assert 0 < moves[50.0] < 0.8 * moves[0.0]


def test_a_site_keeps_its_own_heads_over_the_averaged_ones(site) -> None:
    settings = replace(SETTINGS, lr=1e-9)  # round 1 hardly moves: what it starts from shows
    for local in (True, False):
        data = replace(site)  # a site's data of its own: the heads live with it
        model = fresh()
        optimizer = make_optimizer(model, settings.lr)
        train_task(model, data, optimizer, "cpu", 0, replace(settings, local_heads=local))
        heads = flat(model, "classifier")
        torch.manual_seed(1)
        averaged = build_model(settings.model, **settings.model_options).state_dict()
        with torch.no_grad():  # the aggregate arrives: other sites' heads averaged in
            for name, value in model.state_dict().items():
                if name.startswith("classifier"):
                    value.copy_(averaged[name])
        train_task(model, data, optimizer, "cpu", 1, replace(settings, local_heads=local))
        after = flat(model, "classifier")
        other = torch.cat([v.flatten() for k, v in averaged.items() if k.startswith("classifier")])
        assert (heads - other).abs().max() > 1e-2  # the two are told apart
        torch.testing.assert_close(after, heads if local else other, atol=1e-5, rtol=0)
        expected = (
            heads if local else torch.cat([v.flatten() for k, v in averaged.items() if k.startswith("classifier")])
        )
        torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)
        assert (heads - expected).abs().max() > 1e-2 or local
    assert not restore_site_heads(fresh(), replace(site))  # nothing kept, nothing changed


def test_a_model_without_heads_cannot_keep_them(site) -> None:
    settings = replace(SETTINGS, model="autoencoder", model_options={}, local_heads=True)
    model = fresh(settings)
    with pytest.raises(SiteError, match="local_heads: a autoencoder has no heads"):
        train_task(model, site, make_optimizer(model, settings.lr), "cpu", 0, settings)


def test_the_remedies_are_settings_the_site_guard_checks() -> None:
    with pytest.raises(SettingsError, match="proximal_mu=-1"):
        fed.ExperimentSettings(proximal_mu=-1)
    assert checked_settings(replace(SETTINGS, proximal_mu=0.01, local_heads=True)).local_heads
    sneaky = replace(SETTINGS)
    object.__setattr__(sneaky, "local_heads", "yes")
    with pytest.raises(SettingsError):
        checked_settings(sneaky)
    assert np.isclose(fed.ExperimentSettings().proximal_mu, 0.0) and not fed.ExperimentSettings().local_heads
