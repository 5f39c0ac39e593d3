"""The site review's fuzz campaign, longer than the suite's: how many hostile inputs were tried, how many were
accepted, and how many were refused for which reason, at an envoy and at the director.

    python benchmarks/bench_review_fuzz.py [--examples 3000] [--seed 0]

Hypothesis mutates this project's honest training, evaluation and export archives (``--examples`` inputs
each; tests/fuzz_archives.py says how) and feeds every input to both reviews (``review_everywhere``): each
ends in acceptance or one refusal sentence, within the bound, with no file touched, or the run stops with the
input that broke it. Refusals are counted by reason: the sentence with quoted values and numbers blanked.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_archives import TASKS, Submission, honest, mutations, reason_of, review_everywhere  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402


def campaign(examples: int, random_seed: int) -> tuple[Counter, Counter, float]:
    """(outcomes by node and reason, inputs by task, the longest review in seconds) of one campaign."""
    outcomes: Counter = Counter()
    inputs: Counter = Counter()
    slowest = [0.0]
    with tempfile.TemporaryDirectory() as tmp:
        for task in TASKS:
            inputs[task] = mutate_and_review(honest(task), Path(tmp), examples, random_seed, outcomes, slowest)
    return outcomes, inputs, slowest[0]


def mutate_and_review(
    base: Submission, folder: Path, examples: int, random_seed: int, outcomes: Counter, slowest: list[float]
) -> int:
    """Review ``examples`` mutations of ``base`` at both nodes, counting outcomes; returns how many were tried."""
    tried = 0

    @seed(random_seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutations(base))
    def run(sub: Submission) -> None:
        nonlocal tried
        started = time.monotonic()
        for node, outcome in zip(("envoy", "director"), review_everywhere(sub, folder)):
            outcomes[(node, "accepted" if outcome == "accepted" else reason_of(outcome))] += 1
        slowest[0] = max(slowest[0], time.monotonic() - started)
        tried += 1

    run()
    return tried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=3000, help="inputs per honest archive (3 archives)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.monotonic()
    outcomes, inputs, slowest = campaign(args.examples, args.seed)
    wall = time.monotonic() - started
    total = sum(inputs.values())
    print(f"inputs tried: {total} ({', '.join(f'{t} {n}' for t, n in inputs.items())}), seed {args.seed}")
    for node in ("envoy", "director"):
        mine = {reason: n for (where, reason), n in outcomes.items() if where == node}
        refused = sum(n for reason, n in mine.items() if reason != "accepted")
        print(f"\n{node}: accepted {mine.get('accepted', 0)}, refused {refused}, no other outcome")
        for reason, n in sorted(mine.items(), key=lambda item: -item[1]):
            if reason != "accepted":
                print(f"  {n:6d}  {reason}")
    print(f"\nlongest review of one input (both nodes): {slowest * 1000:.0f} ms; wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
