"""Round time and bytes per round of a site over a WAN, next to a plain link, in one run (root only).

    sudo .venv/bin/python benchmarks/bench_wan.py

Test hosts in network namespaces (``system.testbed``: a director, site-a, site-b and the notebook, each with
its own address on 198.19.0.0/16 and name, joined by a bridge with no route out). The full-size Patch SVDD
(D=64) for 3 short rounds (2 steps of batch 4 per site, fast search), the notebook's side on its own host
(``tests/support/headless.py``), once for each of site-b's links:

- plain: the bridge;
- 80 ms RTT: site-b reaches the director through a relay host that delays every byte by 40 ms each way
  (``tests/support/delay.py``; this kernel has no ``tc netem``);
- 10 Mbit/s: ``tc tbf`` on both ends of site-b's link.

Prints the experiment's time, each round's time (the notebook's round lines) and the bytes on site-b's link
per round (``ip -s link``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from patchsvdd import federated as fed
from patchsvdd.data.synth import generate_category
from patchsvdd.federated.local import Processes, log_contains, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.testbed import Testbed  # noqa: E402
from support.testbed_federation import HEADLESS, start_testbed_federation  # noqa: E402

RELAY_SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "support" / "delay.py"

DIRECTOR, SITE_A, SITE_B, NOTEBOOK, RELAY = (
    "director.hq.test",
    "site-a.plant-a.test",
    "site-b.plant-b.test",
    "notebook.hq.test",
    "relay.wan.test",
)
PORT, AGGREGATOR_PORT = 50050, 50051
SLOW = "tbf rate 10mbit burst 32kbit latency 400ms"
ONE_WAY = 0.040  # seconds the relay adds to each direction: 80 ms RTT
SETTINGS = fed.ExperimentSettings(
    rounds=3,
    repeat=1,
    max_steps=2,
    batch_size=4,
    round_search="fast",
    final_search="fast",
    idle_timeout=900,
    aggregator_port=AGGREGATOR_PORT,
    offline_grace=300,
)
ROUND_LINE = re.compile(r"^round (\d+)/\d+\s+(\d+) s")


def link_bytes(bed: Testbed, host: str) -> int:
    """Bytes both ways on ``host``'s link so far (its port on the bridge)."""
    out = subprocess.run(
        ["ip", "-n", bed.bridge, "-s", "-j", "link", "show", bed.hosts[host].port],
        capture_output=True,
        text=True,
        check=True,
    )
    stats = json.loads(out.stdout)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


def run(label: str, work: Path, data: Path) -> None:
    names = [DIRECTOR, SITE_A, SITE_B, NOTEBOOK, RELAY]
    aliases = {SITE_B: {DIRECTOR: RELAY}} if label == "80 ms RTT" else {}
    with Testbed(names, aliases=aliases) as bed, Processes() as processes:
        if label == "80 ms RTT":
            routes = [f"{RELAY}:{port}={DIRECTOR}:{port}" for port in (PORT, AGGREGATOR_PORT)]
            relay = processes.start(
                "relay",
                bed.command(RELAY, [sys.executable, "-u", str(RELAY_SCRIPT), "--delay", str(ONE_WAY), *routes]),
                work / "logs" / "relay.log",
            )
            wait_for(lambda: log_contains(relay.log, "relaying"), 30, "the relay", [relay])
        if label == "10 Mbit/s":
            inner = f"{bed.tag}v{list(bed.hosts).index(SITE_B) + 1}"
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    bed.bridge,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    bed.hosts[SITE_B].port,
                    "root",
                    *SLOW.split(),
                ],
                check=True,
            )
            subprocess.run(bed.command(SITE_B, ["tc", "qdisc", "add", "dev", inner, "root", *SLOW.split()]), check=True)
        start_testbed_federation(
            work, data, "fabric", bed, processes, DIRECTOR, {"site-a": SITE_A, "site-b": SITE_B}, port=PORT
        )
        spec = {
            "host": DIRECTOR,
            "port": PORT,
            "envoys": ["site-a", "site-b"],
            "name": "wan",
            "settings": asdict(SETTINGS),
            "workdir": str(work / "notebook"),
        }
        (work / "spec.json").write_text(json.dumps(spec))
        before, start = link_bytes(bed, SITE_B), time.monotonic()
        done = subprocess.run(
            bed.command(NOTEBOOK, [sys.executable, str(HEADLESS), str(work / "spec.json")]),
            capture_output=True,
            text=True,
            timeout=1800,
        )
        total, moved = time.monotonic() - start, link_bytes(bed, SITE_B) - before
    lines = done.stdout.splitlines()
    if not any(line.startswith('RESULT {"status": "finished"') for line in lines):
        raise SystemExit(f"{label}: the experiment did not finish:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rounds = [int(m.group(2)) for line in lines if (m := ROUND_LINE.match(line))]
    print(
        f"{label}: experiment {total:.0f} s; rounds {', '.join(f'{s} s' for s in rounds)} (round 0 includes the "
        f"start); site-b's link {moved / 1e6:.1f} MB over {len(rounds)} rounds ({moved / 1e6 / len(rounds):.1f} MB "
        "per round)",
        flush=True,
    )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_wan_"))
    generate_category(work / "data", "fabric", seed=11, n_train=7, n_test_good=2, n_test_per_defect=1, image_size=256)
    for label in ("plain", "80 ms RTT", "10 Mbit/s"):
        run(label, work / label.replace(" ", "_").replace("/", ""), work / "data")


if __name__ == "__main__":
    main()
