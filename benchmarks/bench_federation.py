"""The same experiment on OpenFL and on Flower in one run: each engine's start-up, its overhead per round and its
bytes per round per site, on loopback.

    python benchmarks/bench_federation.py [--rounds 3] [--max-steps 1] [--engines openfl flower flower-secagg]

Run from the OpenFL environment (.venv); the Flower half runs in .venv-flower (``--only flower`` is that half,
printing JSON); ``flower-secagg`` is Flower with ``secure_aggregation`` (SecAgg+: four exchanges a training
round instead of one, masked integer vectors instead of float weights). Each starts its processes through the
start scripts (2 sites, one shard each, one thread each) and trains the same Patch SVDD with the same
settings through ``patchsvdd.experiment``.

- start-up: seconds from launching the processes until the engine lists every site;
- overhead per round: the rounds' wall time (training rounds and the final validation round) less what the
  sites' tasks take, divided by the rounds; the tasks' time is measured here, in this process, on each shard
  with one thread (the slower site of each round counts, as the sites run side by side);
- bytes per round per site: every byte of the engine's TCP ports on loopback (nftables counters, both
  directions, TLS off), divided by the rounds and the sites.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from patchsvdd import experiment
from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.data.synth import generate_category
from patchsvdd.federated.local import Processes
from patchsvdd.federated.progress import VALIDATION
from patchsvdd.federated.site_tasks import round_validation, train_task, validate_task
from patchsvdd.models.registry import build_model
from patchsvdd.settings import ExperimentSettings, settings_from_dict
from patchsvdd.system.probes import free_port
from patchsvdd.training.loop import make_optimizer

REPO = Path(__file__).resolve().parents[1]
TABLE = "patchsvdd_bench"


class PortBytes:
    """nftables counters of every byte to and from some TCP ports on this machine (root only)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        rules = "".join(f"    tcp dport {p} counter\n    tcp sport {p} counter\n" for p in ports)
        script = f"table inet {TABLE} {{\n  chain out {{\n    type filter hook output priority 0;\n{rules}  }}\n}}\n"
        subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True, check=False)
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)

    def total(self) -> int:
        out = subprocess.run(["nft", "-j", "list", "table", "inet", TABLE], capture_output=True, text=True, check=True)
        rules = [item["rule"] for item in json.loads(out.stdout)["nftables"] if "rule" in item]
        return sum(e["counter"]["bytes"] for rule in rules for e in rule["expr"] if "counter" in e)

    def close(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True, check=False)


def site_seconds(data_root: Path, settings: ExperimentSettings, seed: int) -> float:
    """The sites' tasks of the whole experiment, measured here with one thread: for each round the slower site's
    validation (and training, but in the last round), summed over the rounds."""
    torch.set_num_threads(1)
    per_site = []
    for rank in (1, 2):
        shard = load_category(index_category(data_root, "fabric").shard(rank, 2))
        torch.manual_seed(seed)
        model = build_model("patchsvdd", **settings.model_options)
        optimizer = make_optimizer(model, settings.lr)
        rounds = []
        for number in range(settings.rounds + 1):
            start = time.perf_counter()
            validate_task(model, shard, "cpu", **round_validation(settings))
            if number < settings.rounds:
                train_task(model, shard, optimizer, "cpu", number, settings)
            rounds.append(time.perf_counter() - start)
        per_site.append(rounds)
    return sum(max(site[r] for site in per_site) for r in range(settings.rounds + 1))


def run_engine(engine: str, data_root: Path, settings: ExperimentSettings, seed: int, tmp: Path) -> dict[str, Any]:
    """Start ``engine``'s federation, train, and measure (see the module)."""
    with Processes() as processes:
        start = time.perf_counter()
        if engine == "flower":
            from patchsvdd.federated.flower.driver import FlowerEngine
            from patchsvdd.federated.flower.local import start_flower_federation

            local = start_flower_federation(tmp / "run", data_root, "fabric", 2, processes=processes)
            ports = [int(local.superlink.address.rsplit(":", 1)[1])]
            federation: Any = FlowerEngine.connect(local.superlink, tmp / "engine")
        else:
            from patchsvdd.federated.openfl.local import start_federation

            nodes = start_federation(tmp / "run", data_root, "fabric", 2, processes=processes)
            ports = [nodes.port, int(settings.aggregator_port or 0)]
            federation = experiment.connect("openfl", host=nodes.host, port=nodes.port)
        federation.sites(2)
        startup = time.perf_counter() - start
        counter = PortBytes(ports)
        try:
            before = counter.total()
            torch.manual_seed(seed)
            model = build_model("patchsvdd", **settings.model_options)
            start = time.perf_counter()
            experiment.train(federation, model, settings, f"bench-{engine}", tmp / "out", category="fabric",
                             on_metric=lambda record: None)  # fmt: skip
            wall = time.perf_counter() - start
            sent = counter.total() - before
        finally:
            counter.close()
            federation.close()
    rounds = settings.rounds + 1
    label = f"{engine}-secagg" if settings.secure_aggregation else engine
    return {"engine": label, "startup_s": startup, "wall_s": wall, "rounds": rounds, "bytes": sent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=1)
    engines = ("openfl", "flower", "flower-secagg")
    parser.add_argument("--engines", nargs="+", default=list(engines), choices=engines)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("openfl", "flower"), help="run one engine here and print JSON")
    parser.add_argument("--data", type=Path, help="data root holding fabric (made when absent)")
    parser.add_argument("--settings", help="the settings as JSON (the Flower half gets the OpenFL half's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        data = args.data or tmp / "data"
        if not (data / "fabric").is_dir():
            generate_category(data, "fabric", seed=0, n_train=8, n_test_good=2, n_test_per_defect=1, image_size=256)
        settings = (
            settings_from_dict(json.loads(args.settings))
            if args.settings
            else ExperimentSettings(
                rounds=args.rounds, repeat=1, max_steps=args.max_steps, batch_size=4, warmup_steps=0,
                model_options={"emb_dim": 16}, precision="fp32", idle_timeout=600, aggregator_port=free_port(),
            )
        )  # fmt: skip
        if args.only:
            print(json.dumps(run_engine(args.only, data, settings, args.seed, tmp / args.only)))
            return 0
        results = []
        for engine in args.engines:
            if engine == "openfl":
                results.append(run_engine("openfl", data, settings, args.seed, tmp / "openfl"))
                continue
            python = os.environ.get("PATCHSVDD_FLOWER_PY", str(REPO / ".venv-flower" / "bin" / "python"))
            command = [python, __file__, "--only", "flower", "--data", str(data), "--seed", str(args.seed)]
            asked = replace(settings, secure_aggregation=engine == "flower-secagg")
            done = subprocess.run(
                [*command, "--settings", json.dumps(asked.to_dict())], capture_output=True, text=True, check=False
            )
            if done.returncode:
                print(done.stdout[-2000:], done.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        tasks = site_seconds(data, settings, args.seed)
        print(
            f"{settings.rounds} training rounds + 1 validation round, {settings.max_steps} step(s) of batch "
            f"{settings.batch_size} per site per round, 2 sites on loopback, TLS off; the sites' tasks take "
            f"{tasks:.1f} s in all (measured here, one thread)"
        )
        for r in results:
            overhead = (r["wall_s"] - tasks) / r["rounds"]
            per_site = r["bytes"] / r["rounds"] / 2
            print(
                f"{r['engine']:13s} start-up {r['startup_s']:5.1f} s   rounds {r['wall_s']:6.1f} s   overhead "
                f"{overhead:5.1f} s per round   {per_site / 1e6:6.2f} MB per round per site"
            )
        model_mb = sum(t.numel() * 4 for t in build_model("patchsvdd", **settings.model_options).state_dict().values())
        print(f"(the model's weights: {model_mb / 1e6:.2f} MB; {VALIDATION} is validated every round)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
