"""What a site's dropped link costs: the same experiment with site-b's link cut for 0, 30 and 120 s (root only).

    sudo .venv/bin/python benchmarks/bench_link_cut.py [--cuts 0 30 120]

Test hosts in network namespaces (``system.testbed``), mutual TLS with certificates for the hosts' names, a
firewall on the director's host (only its two ports), the director and two envoys through the start
scripts, the notebook's side on its own host (``tests/support/headless.py``) with the default
``offline_grace`` (180 s). Two seconds after the director sent site-b round 0's tasks, site-b's link goes
down for the given time. A fresh federation for every cut. Prints, per cut: how the experiment ended, its
time and the time over the uncut run, and what the logs show of OpenFL's recovery (site-b's collaborator's
reconnect attempts, the director's "offline" listings, whether the envoy registered its shard again).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from patchsvdd import federated as fed
from patchsvdd.data.synth import generate_category
from patchsvdd.federated.local import Processes
from patchsvdd.system.certs import create_federation_certs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.testbed import Testbed  # noqa: E402
from support.testbed_federation import (  # noqa: E402
    TESTBED_EXPERIMENT,
    cut_link_when,
    run_headless,
    start_testbed_federation,
)

DIRECTOR, SITE_A, SITE_B, NOTEBOOK = (
    "director.hq.test",
    "site-a.plant-a.test",
    "site-b.plant-b.test",
    "notebook.hq.test",
)
SITES = {"site-a": SITE_A, "site-b": SITE_B}
PORT, AGGREGATOR_PORT = 50050, 50051
SETTINGS = fed.ExperimentSettings(**TESTBED_EXPERIMENT, idle_timeout=900, aggregator_port=AGGREGATOR_PORT)


def count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text) if path.exists() else 0


def run(cut: float, work: Path, data: Path) -> float:
    """One experiment with site-b's link down ``cut`` seconds; prints a line, returns its seconds."""
    certs = create_federation_certs(work / "pki", [DIRECTOR], list(SITES), ["frontend"])
    with Testbed([DIRECTOR, SITE_A, SITE_B, NOTEBOOK]) as bed, Processes() as processes:
        bed.firewall(DIRECTOR, [PORT, AGGREGATOR_PORT])
        federation = start_testbed_federation(work, data, "fabric", bed, processes, DIRECTOR, SITES, certs, PORT)
        thread = None
        if cut > 0:
            thread, restored = cut_link_when(
                federation, SITE_B, "Sending tasks to collaborator site-b for round 0", cut
            )
        done = run_headless(federation, NOTEBOOK, f"cut-{cut:.0f}", asdict(SETTINGS), work / "nb", timeout=1800)
        if thread is not None:
            thread.join(timeout=cut + 60)
        director, site_b = federation.nodes["director"].log, federation.nodes["site-b"].log
        said = [line for line in done.lines if "offline; waiting" in line or "back online" in line]
        print(
            f"cut {cut:.0f} s: {done.result['status']} in {done.seconds:.0f} s"
            + (f", rounds {done.result['rounds']}" if done.result["status"] == "finished" else f": {done.result}")
            + f"; site-b's collaborator tried the aggregator {count(site_b, 'Attempting to connect to aggregator')}"
            f" times; the director accepted site-b's shard {count(director, 'accepted shard for site-b')} time(s)"
            + (f"; the notebook said: {' | '.join(said)}" if said else ""),
            flush=True,
        )
        return done.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cuts", type=float, nargs="+", default=[0.0, 30.0, 120.0], help="seconds of each cut")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_link_cut_"))
    generate_category(work / "data", "fabric", seed=11, n_train=7, n_test_good=2, n_test_per_defect=1, image_size=256)
    baseline = None
    for cut in args.cuts:
        seconds = run(cut, work / f"cut{cut:.0f}", work / "data")
        if cut == 0:
            baseline = seconds
        elif baseline is not None:
            print(f"  cut {cut:.0f} s cost {seconds - baseline:.0f} s over the uncut run", flush=True)


if __name__ == "__main__":
    main()
