"""Round time of a real OpenFL federation on loopback with 2 and with 4 envoys (same data, same work per envoy).

    python benchmarks/bench_openfl_envoys.py [--envoys 2 4] [--rounds 2] [--max-steps 2]

Starts a director and the envoys through the start scripts, runs an experiment
through patchsvdd.federated (as the notebook does) and prints the seconds from
experiment start to its end, per training round.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from patchsvdd import federated as fed
from patchsvdd.data.synth import generate_category
from patchsvdd.federated.local import Processes
from patchsvdd.federated.openfl.local import start_federation
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.system.probes import free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envoys", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_category(
            tmp / "data", "fabric", seed=0, n_train=16, n_test_good=4, n_test_per_defect=2, image_size=256
        )
        for n in args.envoys:
            with Processes() as processes:
                start = time.perf_counter()
                nodes = start_federation(tmp / f"run{n}", tmp / "data", "fabric", n_envoys=n, processes=processes)
                ready = time.perf_counter() - start
                client = fed.connect(nodes.host, nodes.port)
                settings = fed.ExperimentSettings(
                    rounds=args.rounds,
                    repeat=1,
                    max_steps=args.max_steps,
                    batch_size=args.batch_size,
                    idle_timeout=600,
                    aggregator_port=free_port(),
                )
                torch.manual_seed(0)
                start = time.perf_counter()
                experiment = fed.start_experiment(client, PatchSVDD(), settings, f"load-{n}", tmp / f"nb{n}")
                log = fed.follow_metrics(experiment, idle_timeout=600)
                seconds = time.perf_counter() - start
                envoys = {o for o in log.final("train") if o != "aggregator"}
                print(
                    f"{n} envoys: ready in {ready:5.1f} s; {args.rounds} rounds + final validation in {seconds:6.1f} s "
                    f"= {seconds / args.rounds:5.1f} s per round; {len(envoys)} envoys trained "
                    f"({args.max_steps} steps of batch {args.batch_size} each, {16 // n} training images each)"
                )


if __name__ == "__main__":
    main()
