"""The demo's summary: what a finished run says, read from the executed notebook and its result files
(``runs/<time>/notebook/``), and whether its budget was one at which the model can learn."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from patchsvdd.settings import DEMO_DATA, DEMO_SETTINGS, HELDOUT_METRICS, LEARN_BUDGET

NOTEBOOK = Path("workspace") / "PatchSVDD_with_Director.ipynb"
# The phases of the notebook, each named by a call that only its cell makes (papermill times every cell).
PHASES = (
    ("rounds", "experiment.train("),
    ("evaluation", "experiment.evaluate("),
    ("export", "experiment.export("),
    ("gallery", "plots.save_gallery("),
)


def detection_noise(learning: Sequence[dict], sizes: dict[str, tuple[int, int]]) -> list[str]:
    """Summary lines: the standard error each envoy's det_sum has from its test-set size alone (Hanley and
    McNeil), untrained and trained, so that a reader can tell a gain from the noise of a small test set."""
    from patchsvdd.evaluation.metrics import auroc_standard_error

    parts = []
    for row in learning:
        good, defective = sizes.get(row["node"], (0, 0))
        values = [row.get("det_sum untrained"), row.get("det_sum trained")]
        if good and defective and all(isinstance(v, (int, float)) for v in values):
            errors = " -> ".join(f"{auroc_standard_error(float(v), good, defective):.3f}" for v in values)  # type: ignore[arg-type]
            parts.append(f"{row['node']} ({good} good, {defective} defective) {errors}")
    if not parts:
        return []
    return [
        "  det_sum standard error, untrained -> trained, from the test-set size alone (Hanley-McNeil: another draw",
        "  of as many test images moves det_sum by about this much): " + "; ".join(parts),
    ]


def phase_seconds(executed: Path) -> dict[str, float]:
    """Seconds of each phase of ``PHASES`` in a notebook papermill executed (from its cells' recorded
    durations; 'other' is every other cell), so that a reader sees where the time went."""
    out: dict[str, float] = {}
    for cell in json.loads(executed.read_text())["cells"]:
        seconds = cell.get("metadata", {}).get("papermill", {}).get("duration")
        if cell["cell_type"] != "code" or seconds is None:
            continue
        source = "".join(cell["source"])
        name = next((phase for phase, call in PHASES if call in source), "other")
        out[name] = out.get(name, 0.0) + float(seconds)
    return out


def summarise(run_dir: Path, seconds: float, started: float | None = None) -> str:
    """A few lines: where results are, untrained against trained, the final metrics, the time."""
    from patchsvdd.evaluation.report import fmt, test_set_sizes, untrained_vs_trained

    results = run_dir / "notebook"
    final = json.loads((results / "metrics.json").read_text())
    network = final.get("network", "patchsvdd")
    keys = (HELDOUT_METRICS[network], "det_sum", "seg_sum")
    lines = [f"demo ({network}) finished in {seconds:.0f} s; results in {run_dir}"]
    executed = run_dir / NOTEBOOK.name
    if executed.is_file():
        phases = {**({} if started is None else {"data and start": started}), **phase_seconds(executed)}
        lines.append("  time per phase: " + ", ".join(f"{name} {value:.0f} s" for name, value in phases.items()))
    learning = untrained_vs_trained(json.loads((results / "round_metrics.json").read_text()), keys)
    lines.append("  untrained (round 0) -> trained (final round), per-round validation on each envoy's own data:")
    for row in learning:
        shown = "  ".join(f"{key} {fmt(row[f'{key} untrained'])} -> {fmt(row[f'{key} trained'])}" for key in keys)
        lines.append(f"  {row['node']:10s} {shown}")
    lines += detection_noise(learning, test_set_sizes(final.get("per_defect", {})))
    lines.append(f"  final evaluation of the {final['model']} model ({final['search']} search):")
    for node, metrics in sorted(final["per_node"].items()):
        lines.append(f"  {node:10s} " + " ".join(f"{k}={fmt(v)}" for k, v in metrics.items()))
    bundles = results / "bundles.json"
    if bundles.is_file():
        lines.append(
            "  inspection bundles written at the sites (patchsvdd predict BUNDLE IMAGES --out DIR, or serve BUNDLE):"
        )
        for row in json.loads(bundles.read_text()):
            lines.append(
                f"  {row['envoy']:10s} {row['bundle at the site']} (image threshold "
                f"{fmt(row['image_threshold'])}, {row['bundle_mb']:.1f} MB)"
            )
    local = results / "local_metrics.json"
    if local.is_file():
        metrics = json.loads(local.read_text())
        lines.append("  notebook   " + " ".join(f"{k}={fmt(v)}" for k, v in metrics.items()))
    return "\n".join(lines)


def budget_note(settings, envoys: int = 2) -> str | None:
    """A sentence when a run on the demo data trains fewer steps per envoy than ``LEARN_BUDGET``: such a first run
    shows the whole path but is too short for the model to beat the untrained encoder (it gets worse before it
    gets better)."""
    from patchsvdd.data.mvtec import holdout_split

    fitting = len(holdout_split(DEMO_DATA["n_train"] // envoys, settings.holdout_fraction)[0])  # per envoy

    def steps(s) -> int:
        return s.rounds * s.train_settings().steps_per_epoch(fitting, s.max_steps)

    learn = replace(settings, **LEARN_BUDGET)
    if settings.model != DEMO_SETTINGS.model or settings.lr != DEMO_SETTINGS.lr or steps(settings) >= steps(learn):
        return None
    return (
        f"  note: {steps(settings)} steps per envoy is a first run, too short to learn: the model gets worse before "
        f'it gets better (docs/benchmarks.md, "The demo"). make demo-learn trains the {steps(learn)} steps at '
        "which it beats the untrained encoder clearly (aggregated det_sum about +0.2)."
    )
