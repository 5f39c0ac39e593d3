"""What a site runs, whatever engine brings the work: its shard as ``SiteData`` and the three tasks (train a
round, validate, export a bundle), made at each site from the experiment's manifest; nothing here travels.

Thin on purpose: the tasks call ``train_epoch``, ``evaluate_category`` and ``export_bundle`` unchanged, and
ask the model's family (``models.registry``) for the rest, so federated, local and tested code paths are the
same. Everything here runs at a site, on that site's own data: validation scores a site's test images
against its own training patches and reports numbers only, so no image leaves a site. No engine is imported
here: OpenFL's wrapping is ``tasks.py``, Flower's ``flower/site.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchsvdd.data.mvtec import CategoryData, holdout_split
from patchsvdd.evaluation.evaluate import evaluate_category
from patchsvdd.evaluation.metrics import flatten_defects
from patchsvdd.evaluation.pooling import sketch_metrics
from patchsvdd.federated.names import child
from patchsvdd.federated.progress import DEFECT_FUSION, final_metrics, round_metrics
from patchsvdd.federated.rounds import set_round, untagged
from patchsvdd.models.registry import family_of
from patchsvdd.settings import ExperimentSettings
from patchsvdd.training.loop import train_epoch


class SiteError(RuntimeError):
    """A task cannot run at this site as configured; the message names the setting to change."""


@dataclass
class SiteData(CategoryData):
    """An envoy's shard (see ``CategoryData``) and the folder at its site where its bundles go (or None)."""

    bundle_folder: str | None = None


def site_data(shard_descriptor: Any) -> SiteData:
    """A site's shard as a ``SiteData`` (uint8 arrays, decoded once) from its shard descriptor: the descriptor's
    ``get_dataset('train')`` and ``get_dataset('test')`` items (image, mask, label), its ``category`` and
    ``bundle_folder``, and the test set's ``defect_types`` and ``names`` where it has them."""
    train = shard_descriptor.get_dataset("train")
    test = shard_descriptor.get_dataset("test")
    test_items = [test[i] for i in range(len(test))]
    labels = np.array([item[2] for item in test_items], dtype=np.int64)
    # a shard descriptor of our own names each test image's defect type; another gets good/defective
    types = list(getattr(test, "defect_types", None) or ["defective" if label else "good" for label in labels])
    return SiteData(
        bundle_folder=getattr(shard_descriptor, "bundle_folder", None),
        category=getattr(shard_descriptor, "category", "shard"),
        train_images=np.stack([train[i][0] for i in range(len(train))]),
        test_images=np.stack([item[0] for item in test_items]),
        test_masks=np.stack([item[1] for item in test_items]),
        test_labels=labels,
        defect_types=types,
        test_names=list(getattr(test, "names", None) or [f"{t}/{i}" for i, t in enumerate(types)]),
    )


SITE_HEADS = "site_heads"  # the attribute of a site's data that keeps its own heads between rounds (local_heads)


def keep_site_heads(model, data) -> None:
    """Keep the site's own heads (the family's ``site_heads``: Patch SVDD's position classifiers) of ``model``
    with the site's ``data``, which lives as long as the experiment does at the site."""
    prefixes = family_of(model).site_heads
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefixes)}
    setattr(data, SITE_HEADS, state)


def restore_site_heads(model, data) -> bool:
    """Put the heads kept with ``data`` back into ``model`` (over the averaged ones); False if none kept."""
    state = getattr(data, SITE_HEADS, None)
    if not state:
        return False
    model.load_state_dict(state, strict=False)
    return True


def proximal_term(model, mu: float):
    """FedProx's penalty: a function giving mu/2 * ||w - w_0||^2 (a scalar tensor), w_0 ``model``'s weights
    now (the round's start)."""
    anchor = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
    return lambda: 0.5 * mu * sum(((p - p0) ** 2).sum() for p, p0 in anchor)


def train_task(model, train_data, optimizer, device, round_num, settings: ExperimentSettings) -> dict:
    """One round of local training on an envoy: ``train_epoch`` of the model on its training images less the
    held-out ones, at the global steps of this round in a schedule over all rounds. With
    ``settings.local_heads`` the site's own heads replace the averaged ones first and are kept after; with
    ``settings.proximal_mu`` the steps add FedProx's proximal term. Tags the model as trained ``round_num`` + 1
    rounds (``rounds.py``); reports its family's ``train_metrics``."""
    model.to(device)
    set_round(model, int(round_num) + 1)
    if settings.local_heads:
        if not family_of(model).site_heads:
            raise SiteError(f"local_heads: a {family_of(model).name} has no heads a site could keep; set it False")
        restore_site_heads(model, train_data)
    recipe = settings.train_settings()
    fit, _ = holdout_split(len(train_data.train_images), settings.holdout_fraction)
    steps = recipe.steps_per_epoch(len(fit), settings.max_steps)
    model_family = family_of(model)
    inputs = model_family.inputs(model, train_data.train_images[fit], train_data.mean)
    losses = train_epoch(
        model,
        inputs,
        optimizer,
        recipe,
        options=settings.options(),
        max_steps=settings.max_steps,
        generator=settings.seed * 100_003 + int(round_num),
        schedule=recipe.lr_schedule(settings.rounds * steps),
        start_step=int(round_num) * steps,
        penalty=proximal_term(model, settings.proximal_mu) if settings.proximal_mu > 0 else None,
    )
    if settings.local_heads:
        keep_site_heads(model, train_data)
    return model_family.round_report(losses)


def heldout_metric(model, data: CategoryData, holdout_fraction: float) -> tuple[str, float]:
    """(name, value) of ``model``'s held-out criterion on the held-out good training images of ``data``:
    'heldout_pos' (Patch SVDD's position loss) or 'heldout_rec' (the autoencoder's loss); NaN without any."""
    model_family = family_of(model)
    name = model_family.heldout_metric
    _, held = holdout_split(len(data.train_images), holdout_fraction)
    if not len(held):
        return name, math.nan
    return name, model_family.heldout(model, model_family.inputs(model, data.train_images[held], data.mean))


def validate_task(
    model, val_data, device, search, metric_names, holdout_fraction, defect_fusion=None, defect_types=None
) -> dict:
    """An envoy's view of the model: its held-out criterion (see ``heldout_metric``) and AUROCs / AUPROs of its
    test images against its own training patches (NaN where
    undefined); with ``defect_fusion``, also that fusion's image-score statistics for each of
    ``defect_types`` as 'defect/<type>/<stat>' (NaN for a type this envoy lacks: the aggregator needs the
    same metrics from every envoy) and sketches of its image and pixel scores from which the notebook pools
    AUROC over all sites (``pooling.sketch_metrics``). Numbers only: the types are folder names, no image
    leaves."""
    model.to(device)
    restore_site_heads(model, val_data)  # with local_heads, the held-out loss is the site's own heads'
    out: dict[str, float] = {}
    heldout = family_of(model).heldout_metric
    if heldout in metric_names:
        out[heldout] = heldout_metric(model, val_data, holdout_fraction)[1]
    aurocs = [name for name in metric_names if name != heldout]
    if aurocs or defect_fusion:
        result = evaluate_category(
            model,
            val_data,
            mode=search,
            defect_names=defect_types,
            with_aupro=any(name.startswith("aupro_") for name in aurocs),
        )
        out.update({name: math.nan if result.metrics[name] is None else result.metrics[name] for name in aurocs})
        if defect_fusion:
            out.update(flatten_defects(result.defects[defect_fusion]))
            out.update(sketch_metrics(result.scores.maps[defect_fusion], val_data.test_labels, val_data.test_masks))
    return out


def export_task(model, val_data, device, name, bank_fraction, max_fpr) -> dict:
    """Write this site's bundle (``name`` in its bundle folder) from ``model`` and its own images, calibrated
    on its own test images; report only numbers: thresholds, whether defects calibrated them, size."""
    from patchsvdd.deploy.bundle import bundle_bytes
    from patchsvdd.deploy.export import export_bundle

    if not getattr(val_data, "bundle_folder", None):
        raise SiteError("this envoy's shard descriptor names no bundle folder (shard_descriptor.params.bundle_folder)")
    model = untagged(model).to(device)  # the bundle's model.pt holds the model's own weights only
    out = child(val_data.bundle_folder, name, "its bundle name")  # a plain name, inside the site's bundle folder
    inspector, _ = export_bundle(
        model, val_data, out, bank_fraction=bank_fraction, max_fpr=max_fpr, info={"experiment": name}
    )
    image, pixel = inspector.image_threshold, inspector.pixel_threshold
    nan = math.nan
    return {
        "image_threshold": image.value,
        "image_fpr": nan if image.fpr is None else image.fpr,
        "image_tpr": nan if image.tpr is None else image.tpr,
        "pixel_threshold": pixel.value,
        "calibrated": float(image.method != "good_quantile"),
        "bundle_mb": bundle_bytes(out) / 1e6,
        "bank_rows_32": float(len(inspector.bundle.banks.get(32, ()))),
    }  # 0 for the autoencoder: no bank


def round_validation(settings: ExperimentSettings, metric_names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``validate_task``'s arguments in a training round: ``metric_names`` (default ``round_metrics`` of the
    model) with ``round_search``."""
    return {
        "search": settings.round_search,
        "metric_names": tuple(round_metrics(settings.model) if metric_names is None else metric_names),
        "holdout_fraction": settings.holdout_fraction,
    }


def final_validation(settings: ExperimentSettings, defect_types: list[str] | None = None) -> dict[str, Any]:
    """``validate_task``'s arguments in the final evaluation: ``final_metrics`` of the model with
    ``final_search`` and, given the ``defect_types`` of all sites, the per-defect statistics."""
    return {
        "search": settings.final_search,
        "metric_names": final_metrics(settings.model),
        "holdout_fraction": settings.holdout_fraction,
        "defect_fusion": DEFECT_FUSION if defect_types else None,
        "defect_types": defect_types,
    }
