"""Is federating worth it? Each site alone, federated and pooled, on the same sites, seeds and compute.

    python benchmarks/bench_federation_value.py --scenario demo            # minutes, the built-in data
    python benchmarks/bench_federation_value.py --scenario iid2 iid4 unequal noniid   # real bottle

A scenario splits one category into sites (``data.sites.split_sites``: the training images in the
scenario's fractions, the test images in equal shares stratified by defect type) and writes each site as an
MVTec AD category of its own, through the site's own acquisition where the scenario has one
(``data.sites.Acquisition.drawn``: colour cast, gamma, blur, small rotation, of training and test images
alike). Then three ways of training, every one from the same initial model (seed) with the same recipe:

- alone: each site trains on its own images only, the rounds and steps it trains in the federation, with the
  envoy's own training task (``federated.openfl.tasks.train_task``, one Adam kept across rounds as the envoys keep
  theirs);
- federated: the real director and envoys, started through the project's start scripts (as the demo), FedAvg,
  the final aggregate (``fetch_last_model``);
- pooled: one model on all sites' training images for the federation's total steps (the sum of the sites').

Every model is scored at every site on that site's own test images against that site's own training bank,
exact search, standardised by the site's own training mean; the alone models at their own site. Printed and
written to ``--out`` (json, a markdown table, one plot per scenario): det_sum, seg_sum, aupro_sum per site and
over all sites' test images together; federated - alone and pooled - federated per site with paired
bootstrap 95 % intervals (test images resampled within class, ``evaluation.bootstrap``); wall time per run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from patchsvdd import federated as fed
from patchsvdd.data.mvtec import CategoryData, holdout_split, index_category, load_category
from patchsvdd.data.sites import Acquisition, split_sites, write_site
from patchsvdd.evaluation import bootstrap
from patchsvdd.evaluation.evaluate import evaluate_category
from patchsvdd.evaluation.metrics import aupro, auroc
from patchsvdd.evaluation.plots import federation_value_figure
from patchsvdd.evaluation.report import markdown_table, write_json
from patchsvdd.federated.local import Processes, project_root
from patchsvdd.federated.openfl.local import start_federation
from patchsvdd.models.registry import build_model
from patchsvdd.settings import DEMO_DATA, PAPER_SETTINGS, recipe_options
from patchsvdd.system.probes import free_port
from patchsvdd.training.loop import make_optimizer

SHARED_MVTEC = project_root() / ".." / "shared" / "mvtec"
WAYS = ("alone", "federated", "pooled")
REMEDIES = {  # federated variants against sites that differ: name -> the settings it changes
    "fedprox": lambda s: replace(s, proximal_mu=0.01),
    "local_heads": lambda s: replace(s, local_heads=True),
    "short_rounds": lambda s: replace(s, rounds=2 * s.rounds, max_steps=max(1, (s.max_steps or 2) // 2)),
}
METRICS = ("det_sum", "seg_sum", "aupro_sum")


@dataclass(frozen=True)
class Scenario:
    """Sites made of one category: ``fractions`` of its training images, each site's acquisition drawn with
    ``acquisition`` strength (0: all sites see the same camera and light)."""

    category: str
    fractions: tuple[float, ...]
    acquisition: float = 0.0
    about: str = ""


SCENARIOS = {
    "demo": Scenario("washer", (0.5, 0.5), about="the built-in demo data (washer), 2 equal sites"),
    "iid2": Scenario("bottle", (0.5, 0.5), about="real bottle, 2 equal sites"),
    "iid4": Scenario("bottle", (0.25,) * 4, about="real bottle, 4 equal sites"),
    "unequal": Scenario("bottle", (0.6, 0.3, 0.1), about="real bottle, 3 sites of 60 %, 30 % and 10 %"),
    "noniid": Scenario("bottle", (0.5, 0.5), acquisition=1.0, about="real bottle, 2 equal sites, own cameras"),
}


def make_sites(name: str, scenario: Scenario, data_root: Path, work: Path, seed: int) -> list[Path]:
    """Write the scenario's sites under ``work``; their data roots (each holds the category)."""
    index = index_category(data_root, scenario.category)
    roots = []
    for number, part in enumerate(split_sites(index, scenario.fractions, seed), start=1):
        acquisition = Acquisition.drawn(seed * 1000 + number, scenario.acquisition)
        root = work / f"site{number}"
        write_site(part, root, acquisition)
        (root / "acquisition.json").write_text(json.dumps(acquisition.to_dict()))
        roots.append(root)
    return roots


def train_rounds(model: torch.nn.Module, data: CategoryData, settings: fed.ExperimentSettings, device: str) -> None:
    """``settings.rounds`` rounds of the envoys' own training task on ``data``, one Adam across rounds."""
    optimizer = make_optimizer(model, settings.lr)
    for round_num in range(settings.rounds):
        fed.train_task(model, data, optimizer, device, round_num, settings)


def pooled_settings(settings: fed.ExperimentSettings, sites: Sequence[CategoryData]) -> fed.ExperimentSettings:
    """The settings of one model trained on every site's images: per round, the sum of the sites' steps."""
    recipe = settings.train_settings()
    fitting = [len(holdout_split(len(d.train_images), settings.holdout_fraction)[0]) for d in sites]
    steps = sum(recipe.steps_per_epoch(n, settings.max_steps) for n in fitting)
    pooled_fitting = len(holdout_split(sum(len(d.train_images) for d in sites), settings.holdout_fraction)[0])
    repeat = max(settings.repeat, math.ceil(steps * settings.batch_size / pooled_fitting))
    return replace(settings, max_steps=steps, repeat=repeat)


def federated_model(
    settings: fed.ExperimentSettings, roots: Sequence[Path], category: str, work: Path
) -> tuple[torch.nn.Module, float, float]:
    """(the final aggregate, seconds to start the federation, seconds of the experiment)."""
    start = time.monotonic()
    with Processes() as processes:
        federation = start_federation(work / "federation", roots[0], category, processes=processes, site_roots=roots)
        ready = time.monotonic()
        client = fed.connect(federation.host, federation.port, **federation.tls)
        fed.wait_for_envoys(client, len(roots))
        torch.manual_seed(settings.seed)
        model = build_model(settings.model, **settings.model_options)
        experiment = fed.start_experiment(client, model, settings, f"value-{int(time.time())}", work / "experiment")
        fed.follow_metrics(experiment, idle_timeout=settings.idle_timeout, registry_poll=2.0)
        trained = fed.fetch_last_model(experiment)
    return trained, ready - start, time.monotonic() - ready


@dataclass
class SiteScores:
    """One model scored at one site: metrics, image scores (M,), the pixel sketch, the maps (M,H,W)."""

    metrics: dict[str, float | None]
    image_scores: np.ndarray
    sketch: bootstrap.PixelSketch
    maps: np.ndarray


def score(model: torch.nn.Module, data: CategoryData, device: str) -> SiteScores:
    result = evaluate_category(model.to(device).eval(), data, mode="exact")
    maps = result.scores.maps["sum"]
    return SiteScores(
        {key: result.metrics[key] for key in METRICS},
        maps.flatten(1).amax(dim=1).numpy(),
        bootstrap.pixel_sketch(maps, data.test_masks),
        maps.numpy(),
    )


def over_all_sites(scored: Sequence[SiteScores], sites: Sequence[CategoryData]) -> dict[str, float | None]:
    """det, seg and aupro of every site's test images together (each scored at its own site)."""
    labels = np.concatenate([d.test_labels for d in sites])
    masks = np.concatenate([d.test_masks for d in sites])
    maps = np.concatenate([s.maps for s in scored])
    return {
        "det_sum": auroc(labels, np.concatenate([s.image_scores for s in scored])),
        "seg_sum": auroc(masks, maps),
        "aupro_sum": aupro(masks, maps),
    }


def run_scenario(name: str, args: argparse.Namespace, settings: fed.ExperimentSettings) -> dict:
    scenario = SCENARIOS[name]
    if scenario.category != "washer" and args.category:
        scenario = replace(scenario, category=args.category, about=scenario.about.replace("bottle", args.category))
    work = args.out / name
    data_root = args.mvtec_root if scenario.category != "washer" else work / "source"
    if scenario.category == "washer":
        from patchsvdd.data.synth import generate_category

        generate_category(data_root, "washer", **DEMO_DATA)
    elif not (data_root / scenario.category / "train").is_dir():
        raise SystemExit(f"{data_root / scenario.category}: not found; give --mvtec-root (scenario {name!r})")
    roots = make_sites(name, scenario, data_root, work, args.seed)
    sites = [load_category(index_category(root, scenario.category)) for root in roots]
    print(
        f"[{name}] {scenario.about}: training images {[len(d.train_images) for d in sites]}, test images "
        f"{[len(d.test_images) for d in sites]}",
        flush=True,
    )
    seconds: dict[str, float] = {}
    models: dict[str, list[torch.nn.Module]] = {}

    start = time.monotonic()
    models["alone"] = []
    for data in sites:
        torch.manual_seed(settings.seed)
        model = build_model(settings.model, **settings.model_options).to(args.device)
        train_rounds(model, data, settings, args.device)
        models["alone"].append(model)
    seconds["alone"] = time.monotonic() - start

    trained, seconds["federation start"], seconds["federated"] = federated_model(
        settings, roots, scenario.category, work
    )
    models["federated"] = [trained] * len(sites)
    for remedy in args.remedies:
        way = f"federated {remedy}"
        trained, _, seconds[way] = federated_model(REMEDIES[remedy](settings), roots, scenario.category, work / way)
        models[way] = [trained] * len(sites)
    ways = [*WAYS, *(f"federated {remedy}" for remedy in args.remedies)]

    start = time.monotonic()
    pooled = replace(sites[0], train_images=np.concatenate([d.train_images for d in sites]))
    torch.manual_seed(settings.seed)
    model = build_model(settings.model, **settings.model_options).to(args.device)
    train_rounds(model, pooled, pooled_settings(settings, sites), args.device)
    models["pooled"] = [model] * len(sites)
    seconds["pooled"] = time.monotonic() - start

    start = time.monotonic()
    scored = {way: [score(m, d, args.device) for m, d in zip(models[way], sites, strict=True)] for way in ways}
    seconds["scoring"] = time.monotonic() - start
    print(f"[{name}] seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), flush=True)

    rows, gains = [], []
    for number, data in enumerate(sites):
        site = f"site{number + 1} ({len(data.train_images)} train)"
        labels = data.test_labels
        for way in ways:
            s = scored[way][number]
            det = bootstrap.bootstrap_interval(bootstrap.detection_auroc(labels, s.image_scores), labels, args.draws)
            rows.append(
                {
                    "site": site,
                    "way": way,
                    **s.metrics,
                    "det_sum 95%": f"[{det.low:.3f}, {det.high:.3f}]",
                    "det_low": det.low,
                    "det_high": det.high,
                }
            )
        for a, b in (("alone", "federated"), ("federated", "pooled"), *(("federated", w) for w in ways[3:])):
            sa, sb = scored[a][number], scored[b][number]
            gain = {"site": site, "difference": f"{b} - {a}"}
            for metric, ma, mb in (
                (
                    "det_sum",
                    bootstrap.detection_auroc(labels, sa.image_scores),
                    bootstrap.detection_auroc(labels, sb.image_scores),
                ),
                ("seg_sum", bootstrap.segmentation_auroc(sa.sketch), bootstrap.segmentation_auroc(sb.sketch)),
            ):
                interval = bootstrap.paired_interval(ma, mb, labels, args.draws, seed=args.seed)
                exact = (sb.metrics[metric] or math.nan) - (sa.metrics[metric] or math.nan)
                gain[metric] = f"{exact:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"
            gains.append(gain)
    for way in ways:
        rows.append({"site": "all sites", "way": way, **over_all_sites(scored[way], sites)})
    result = {
        "scenario": name,
        "about": scenario.about,
        "settings": settings.to_dict(),
        "pooled_steps_per_round": pooled_settings(settings, sites).max_steps,
        "train_images": [len(d.train_images) for d in sites],
        "test_images": [len(d.test_images) for d in sites],
        "acquisitions": [json.loads((root / "acquisition.json").read_text()) for root in roots],
        "seconds": seconds,
        "rows": rows,
        "gains": gains,
        "draws": args.draws,
    }
    write_json(args.out / f"{name}.json", result)
    table = markdown_table(rows, ["site", "way", *METRICS, "det_sum 95%"])
    gain_table = markdown_table(gains, ["site", "difference", "det_sum", "seg_sum"])
    (args.out / f"{name}.md").write_text(f"{table}\n\n{gain_table}\n")
    federation_value_figure(rows, f"{name}: {scenario.about}").savefig(
        args.out / f"{name}.png", dpi=80, bbox_inches="tight"
    )
    print(table, "\n", gain_table, sep="\n", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", nargs="+", choices=tuple(SCENARIOS), default=["demo"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="steps per round per site (max_steps)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--schedule",
        choices=("cpu", "paper"),
        default="cpu",
        help="cpu: the project's CPU recipe; paper: lr 1e-4 constant, fp32, 10 rounds of 240 steps "
        "at batch 64 (needs a GPU)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--draws", type=int, default=1000, help="bootstrap draws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--remedies",
        nargs="*",
        choices=tuple(REMEDIES),
        default=[],
        help="federated variants run beside plain FedAvg: fedprox (mu 0.01), local_heads (each site "
        "keeps its position classifiers), short_rounds (twice the rounds of half the steps)",
    )
    parser.add_argument("--mvtec-root", type=Path, default=SHARED_MVTEC, help="the data root of the real scenarios")
    parser.add_argument("--category", help="the real scenarios' category instead of bottle")
    parser.add_argument("--out", type=Path, default=Path("runs") / f"federation_value_{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    settings = fed.ExperimentSettings(
        rounds=args.rounds,
        max_steps=args.steps,
        batch_size=args.batch_size,
        warmup_steps=min(40, args.steps),
        round_search="fast",
        final_search="exact",
        seed=args.seed,
        idle_timeout=1800.0,
        aggregator_port=free_port(),
        device_policy="CUDA_PREFERRED" if args.device.startswith("cuda") else "CPU_ONLY",
    )
    if args.schedule == "paper":
        if not args.device.startswith("cuda"):
            raise SystemExit(
                "--schedule paper trains 10 rounds of 240 steps at batch 64 per site: it needs a GPU "
                "(--device cuda); on a CPU use the default --schedule cpu"
            )
        paper = {k: v for k, v in asdict(PAPER_SETTINGS).items() if k in {f for f in asdict(settings)}}
        options = {**settings.model_options, **recipe_options("paper", settings.model)}
        settings = replace(
            settings, **paper, model_options=options, rounds=10, max_steps=240, batch_size=64, repeat=100
        )
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"settings: {settings}; device {args.device}; out {args.out}", flush=True)
    for name in args.scenario:
        run_scenario(name, args, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
