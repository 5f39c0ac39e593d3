"""Round time and bytes per round of a site behind a slow link, next to a plain link, in one run (root only).

    sudo .venv/bin/python benchmarks/bench_wan.py

A director and envoy_1 here, envoy_2 in a network namespace behind a veth pair
(``harness.SiteLink``, no route out; a /24 of 198.18.0.0/15 chosen from the process id); the full-size Patch SVDD
(D=64) for 3 short rounds (2 steps of batch 4,
fast search), once on the plain veth and once rate-limited to 10 Mbit/s each way with ``tc tbf``. Prints the
experiment's time, the time from one round's line to the next, and the bytes on envoy_2's link
(``ip -s link``). Delay (RTT) needs ``tc netem``, which kernels without the sch_netem module lack.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from patchsvdd import federated as fed
from patchsvdd.data.synth import generate_category
from patchsvdd.models.base import count_parameters
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.system.harness import Processes, SiteLink, start_split_federation
from patchsvdd.system.probes import free_port

SLOW = "tbf rate 10mbit burst 32kbit latency 400ms"
SETTINGS = fed.ExperimentSettings(
    rounds=3, repeat=1, max_steps=2, batch_size=4, round_search="fast", final_search="fast", idle_timeout=900
)


def link_bytes(device: str) -> tuple[int, int]:
    """(received, sent) bytes of ``device`` so far."""
    out = subprocess.run(["ip", "-s", "-j", "link", "show", device], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout)[0]["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_wan_"))
    generate_category(work / "data", "fabric", seed=11, n_train=7, n_test_good=2, n_test_per_defect=1, image_size=256)
    with SiteLink(f"psw{os.getpid() % 100000}", index=10 + os.getpid() % 240) as link, Processes() as processes:
        host_side, site_side = f"{link.name}h", f"{link.name}s"
        nodes = start_split_federation(work, work / "data", "fabric", link, processes)
        client = fed.connect(nodes.host, nodes.port)
        for number, (label, qdisc) in enumerate([("plain veth", None), ("10 Mbit/s each way (tc tbf)", SLOW)]):
            if qdisc:
                for prefix, device in (([], host_side), (["ip", "netns", "exec", link.name], site_side)):
                    subprocess.run([*prefix, "tc", "qdisc", "add", "dev", device, "root", *qdisc.split()], check=True)
            torch.manual_seed(0)
            model = PatchSVDD()
            lines: list[float] = []
            show = fed.RoundLines(
                fed.round_metrics("patchsvdd"),
                rounds=SETTINGS.rounds,
                write=lambda line, lines=lines: lines.append(time.monotonic()),
            )
            before, start = link_bytes(host_side), time.monotonic()
            experiment = fed.start_experiment(
                client,
                model,
                replace(SETTINGS, aggregator_port=free_port()),
                f"wan-{number}",
                work / f"notebook{number}",
            )
            fed.follow_metrics(experiment, idle_timeout=900, registry_poll=1.0, offline_grace=300, on_metric=show)
            total = time.monotonic() - start
            after = link_bytes(host_side)
            up, down = after[0] - before[0], after[1] - before[1]
            gaps = ", ".join(f"{b - a:.1f}" for a, b in zip(lines, lines[1:]))
            rounds = SETTINGS.rounds + 1
            print(
                f"{label}: experiment {total:.0f} s; round to round {gaps} s; envoy_2's link: {down / 1e6:.1f} MB to "
                f"the site, {up / 1e6:.1f} MB from it over {rounds} rounds ({(up + down) / 1e6 / rounds:.1f} MB per "
                f"round); model {count_parameters(model):,} parameters ({count_parameters(model) * 4 / 1e6:.1f} MB "
                "in fp32)",
                flush=True,
            )


if __name__ == "__main__":
    main()
