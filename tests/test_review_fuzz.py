"""The fuzz campaign of the site's review, seeded and bounded: hypothesis mutates this project's honest archives
(zip members, plan keys and values, the manifest, weight arrays, names: tests/fuzz_archives.py) and feeds each
to the review at an envoy and at the director. Each must end in acceptance (and then the site can build what
it accepted) or one refusal sentence, never in another exception, a review over its time bound, or a file
touched. benchmarks/bench_review_fuzz.py runs the same campaign longer and counts the refusals by reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz_archives import TASKS, honest, mutations, review_everywhere
from hypothesis import HealthCheck, given, settings

BASES = {task: honest(task) for task in TASKS}
CAMPAIGN = settings(
    max_examples=150, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


@pytest.mark.parametrize("task", TASKS)
def test_every_mutation_of_an_honest_archive_is_accepted_or_refused_with_a_sentence(
    task: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp(f"fuzz_{task}")
    seen: list[list[str]] = []

    @CAMPAIGN
    @given(mutations(BASES[task]))
    def campaign(sub) -> None:
        outcomes = review_everywhere(sub, folder)
        assert all(outcome == "accepted" or outcome.startswith(("its ", "it ", "an ")) for outcome in outcomes)
        seen.append(outcomes)

    campaign()
    refusals = [o for outcomes in seen for o in outcomes if o != "accepted"]
    assert len(seen) >= 100 and len(refusals) > len(seen)  # the mutations do reach the checks


def test_the_honest_archives_themselves_are_accepted_everywhere(tmp_path: Path) -> None:
    for task, base in BASES.items():
        assert review_everywhere(base, tmp_path) == ["accepted", "accepted"], task
