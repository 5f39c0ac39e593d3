"""An experiment's life cycle, whatever federation engine runs it: train, choose the model, evaluate, export.

The engine is an adapter (``Engine``; ``ENGINES`` names OpenFL's and Flower's, ``connect`` opens one) that only runs an
experiment's tasks at the sites, aggregates and reports metrics; what an experiment is travels as its
manifest (``federated.manifest``). This module owns the rest, the same for every engine:

- ``train``: the rounds, each metric to ``on_metric`` (default: one line per round, ``RoundLines``);
  ``best.pt`` each time the aggregated held-out loss improves (``SaveWhenImproved``), ``last.pt`` at the end,
  the final model by ``settings.final_model``; ``round_metrics.json`` and ``learning.json``;
- ``evaluate``: the final evaluation at every site, pooled over the sites; ``metrics.json``;
- ``export``: every site writes its own bundle; ``bundles.json``.

The notebook, the demo (through the notebook) and the headless runner call these. No engine is imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from patchsvdd.evaluation import report
from patchsvdd.federated.manifest import ExperimentManifest, Export, experiment_manifest
from patchsvdd.federated.progress import MetricLog, RoundLines, SaveWhenImproved, final_metrics, round_metrics
from patchsvdd.federated.rounds import untagged
from patchsvdd.settings import HELDOUT_METRICS, ExperimentSettings
from patchsvdd.training.checkpoint import load_checkpoint, save_checkpoint

OnMetric = Callable[[dict[str, Any]], None]


class Run(Protocol):
    """One experiment an engine runs."""

    def follow(
        self, on_metric: OnMetric | None, checkpointer: SaveWhenImproved | None, settings: ExperimentSettings
    ) -> MetricLog:
        """Every metric until the experiment ends (giving up as ``settings`` say: idle, offline grace)."""

    def aggregated_model(self) -> nn.Module:
        """The latest aggregated model, round-tagged (``federated.rounds``)."""


class Engine(Protocol):
    """What a federation engine does for this project: the sites, and runs of manifests at them."""

    def sites(self, expected: int) -> list[dict[str, Any]]:
        """One row per site (envoy, online, description, shapes) once ``expected`` are online."""

    def defect_types(self) -> list[str] | None:
        """The defect types the sites' shards hold, 'good' first (None where a site does not say)."""

    def bundle_folders(self) -> dict[str, str | None]:
        """{site: the folder where its bundles go}."""

    def start(self, model: nn.Module, manifest: ExperimentManifest, name: str, workdir: Path) -> Run:
        """Send ``model`` (round-tagged by the engine) and ``manifest`` as experiment ``name``."""

    def attach(self, name: str, model: nn.Module, workdir: Path) -> Run:
        """Take up experiment ``name`` again (started from ``workdir``) after the caller lost it."""

    def close(self) -> None:
        """End this session with the federation."""


# The engines by name: 'module:Class', each with a classmethod ``open`` taking ``connect``'s keywords.
ENGINES = {
    "openfl": "patchsvdd.federated.openfl.engine:OpenFLEngine",
    "flower": "patchsvdd.federated.flower.driver:FlowerEngine",
}


def connect(
    engine: str,
    *,
    host: str,
    port: int,
    tls: bool = False,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    workdir: Path | None = None,
) -> Engine:
    """The federation at ``host:port`` through ``engine`` ('openfl': a director; 'flower': a SuperLink), its
    adapter imported only now. ``tls``: mutual TLS, the server verified with the authority ``ca``, this side
    showing ``cert``/``key``; Flower takes the run's ServerApp task with the SuperLink's ``secret`` file and
    writes its app and CLI settings into ``workdir``."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose {' or '.join(ENGINES)}")
    module, _, name = ENGINES[engine].partition(":")
    adapter = getattr(import_module(module), name)
    return adapter.open(
        host=host, port=port, tls=tls, ca=ca, cert=cert, key=key, secret=secret, workdir=Path(workdir or ".")
    )


@dataclass
class Training:
    """What ``train`` leaves: the metrics, the best round and score, the last and the final model."""

    name: str
    log: MetricLog
    heldout: str
    best_round: int | None
    best_score: float
    last_model: nn.Module
    final_model: nn.Module
    final_note: str
    learning: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Evaluation:
    """The final evaluation: each node's metrics (and 'pooled') and each site's table per defect type."""

    per_node: dict[str, dict[str, float]]
    per_defect: dict[str, dict[str, dict[str, float]]]


def train(
    engine: Engine,
    model: nn.Module,
    settings: ExperimentSettings,
    name: str,
    out: Path,
    *,
    category: str,
    attach: bool = False,
    on_metric: OnMetric | None = None,
) -> Training:
    """Train ``model`` federatedly as ``settings`` say (or, with ``attach``, take up experiment ``name`` again);
    writes ``best.pt``, ``last.pt``, ``round_metrics.json`` and ``learning.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "experiment"
    if attach:
        run = engine.attach(name, model, workdir)
    else:
        run = engine.start(model, experiment_manifest(model, settings, "training"), name, workdir)
    heldout = HELDOUT_METRICS[settings.model]
    metadata: dict[str, Any] = dict(category=category, experiment=name, settings=settings.to_dict())
    saver = SaveWhenImproved(None, out / "best.pt", metric=heldout, fetch=run.aggregated_model, **metadata)
    lines = on_metric if on_metric is not None else RoundLines(round_metrics(settings.model), rounds=settings.rounds)
    log = run.follow(lines, saver, settings)
    report.write_json(out / "round_metrics.json", log.to_jsonable())
    learning = report.untrained_vs_trained(log.records, round_metrics(settings.model))
    report.write_json(out / "learning.json", learning)
    last = untagged(run.aggregated_model())
    save_checkpoint(last, out / "last.pt", which="last", **metadata)
    if settings.final_model == "best" and saver.saved_round is not None:
        final, meta = load_checkpoint(out / "best.pt")
        note = f"final evaluation of best.pt: round {meta['round']}, {heldout} {meta['score']:.4f}"
    else:
        final, note = last, "final evaluation of last.pt"
    return Training(name, log, heldout, saver.best_round, saver.best_score, last, final, note, learning)


def evaluate(
    engine: Engine, model: nn.Module, settings: ExperimentSettings, name: str, out: Path, suffix: str = "-final"
) -> Evaluation:
    """Every site scores ``model`` on its own data (``settings.final_search``) as experiment ``name + suffix``;
    writes ``metrics.json`` into ``out``: per node, 'aggregator' (the sites' mean by test size) and 'pooled'
    (all sites' test images together), and per defect type at each site."""
    manifest = experiment_manifest(model, settings, "evaluation", defect_types=engine.defect_types())
    run = engine.start(model, manifest, name + suffix, Path(out) / "evaluation")
    per_node, per_defect = report.final_evaluation(run.follow(None, None, settings).final())
    record = {
        "experiment": name,
        "network": settings.model,
        "model": settings.final_model,
        "search": settings.final_search,
        "per_node": per_node,
        "per_defect": per_defect,
    }
    report.write_json(Path(out) / "metrics.json", record)
    return Evaluation(per_node, per_defect)


def export(
    engine: Engine,
    model: nn.Module,
    settings: ExperimentSettings,
    name: str,
    out: Path,
    bank_fraction: float = 1.0,
    suffix: str = "-bundle",
) -> list[dict[str, Any]]:
    """Every site writes bundle ``name + suffix`` of ``model`` in its own bundle folder from its own images; one
    row per site (where, thresholds, size: nothing else comes back), also in ``bundles.json`` in ``out``."""
    bundle = name + suffix
    manifest = experiment_manifest(model, settings, "export", export=Export(bundle, bank_fraction, None))
    sites = engine.start(model, manifest, bundle, Path(out) / "bundles").follow(None, None, settings).final()
    folders = engine.bundle_folders()
    rows = [
        {"envoy": node, "bundle at the site": f"{folders.get(node)}/{bundle}", **values}
        for node, values in sorted(sites.items())
        if node != "aggregator"
    ]
    report.write_json(Path(out) / "bundles.json", rows)
    return rows


def final_table(evaluation: Evaluation, settings: ExperimentSettings) -> str:
    """The final metrics as a Markdown table, one row per node."""
    return report.markdown_table(report.metrics_rows(evaluation.per_node, final_metrics(settings.model)))
