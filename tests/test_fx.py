"""The director's fx with OpenFL's fixed 10-second waits cut to a second, and nothing else changed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from openfl.component.aggregator.aggregator import Aggregator
from openfl.component.director import experiment

from patchsvdd.federated.openfl import fx


@pytest.fixture
def restored():
    """Undo the patch after the test: this process is not a director."""
    sleep_time, module_asyncio = Aggregator.__dict__["_get_sleep_time"], experiment.asyncio
    yield
    Aggregator._get_sleep_time, experiment.asyncio = sleep_time, module_asyncio


def test_openfl_waits_ten_seconds_before_the_patch() -> None:
    assert Aggregator._get_sleep_time() == 10  # what the patch is for; a new OpenFL may have changed it
    assert experiment.asyncio is asyncio


def test_the_patch_cuts_only_the_fixed_waits(restored) -> None:
    fx.cut_fixed_waits()
    assert Aggregator._get_sleep_time() == fx.POLL_SECONDS == 1
    patched = experiment.asyncio
    assert patched is not asyncio and patched.Queue is asyncio.Queue and patched.Lock is asyncio.Lock
    start = time.monotonic()
    assert asyncio.run(patched.sleep(10, result="done")) == "done"
    assert time.monotonic() - start < 3
    start = time.monotonic()
    asyncio.run(patched.sleep(0.2))  # shorter sleeps are kept
    assert time.monotonic() - start >= 0.19
    assert asyncio.sleep is not patched.sleep  # every other module keeps asyncio's own sleep


def test_the_module_runs_openfls_command_line() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "patchsvdd.federated.openfl.fx", "director", "start", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "--director-config-path" in run.stdout


def test_an_envoy_whose_name_is_not_plain_does_not_start() -> None:
    """Experiments name their sites, and a site's workspace is named after it: one plain name, as theirs."""
    run = subprocess.run(
        [sys.executable, "-m", "patchsvdd.federated.openfl.fx", "envoy", "start", "-n", "site a/..", "-ec", "x.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "envoy: the envoy's name 'site a/..' is not a plain name (1 to 100 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit, no '..')"
    )
