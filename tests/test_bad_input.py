"""Bad input through the real start scripts: one clear line, a non-zero exit within seconds, no process left.

Each script runs in its own session; afterwards no process of that session may
remain (an envoy or director left running in the background is a leak).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import BAD_DATA_CASES

from patchsvdd.federated.local import Processes, project_root, wait_for, with_this_environment
from patchsvdd.federated.openfl.local import write_director_config
from patchsvdd.system.probes import free_port, listens

REPO = project_root()

ENVOY = REPO / "envoy_folder" / "start_envoy.sh"
DIRECTOR = REPO / "director_folder" / "start_director.sh"
ENV = {"PATH": with_this_environment("/usr/bin:/bin")}  # fx of the environment running the tests


def _session_members(sid: int) -> list[str]:
    """Command lines of the processes whose session id is ``sid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:  # fields after the name: state, ppid, pgrp, session
            found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return found


def run_script(
    command: list[str], workdir: Path, timeout: float = 60, path: str = ENV["PATH"]
) -> tuple[subprocess.CompletedProcess, float]:
    """Run a start script in a new session with PATH ``path``; returns the result and the seconds it took.
    Asserts nothing is left."""
    start = time.monotonic()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**ENV, "PATH": path, "PATCHSVDD_WORKDIR": str(workdir)},
    )
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    seconds = time.monotonic() - start
    assert _session_members(process.pid) == [], "processes left behind"
    return subprocess.CompletedProcess(command, process.returncode, out, err), seconds


def assert_one_line_error(result: subprocess.CompletedProcess, seconds: float, *texts: str) -> None:
    """Exit code 2 (within run_script's timeout), and stderr one line holding every one of ``texts``."""
    assert result.returncode == 2, result.stderr
    assert all(text in result.stderr for text in texts), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _shard_config(path: Path, data_root: Path, rank_worldsize: str = "1,1") -> Path:
    path.write_text(
        "params: {cuda_devices: [], install_requirements: false}\n"
        "shard_descriptor:\n  template: mvtec_shard_descriptor.MVTecShardDescriptor\n"
        f"  params: {{data_folder: {data_root}, category: fabric, rank_worldsize: '{rank_worldsize}'}}\n"
    )
    return path


@pytest.mark.parametrize("how", [*BAD_DATA_CASES, "truncated png"])
def test_envoy_with_bad_data_stops_with_the_path_before_contacting_the_director(
    writable_category: Path, break_category, tmp_path: Path, how: str
) -> None:
    expected = break_category(writable_category, how)
    root = writable_category / "nowhere" if how == "missing root" else writable_category
    config = _shard_config(tmp_path / "shard.yaml", root)
    # No director on this port: the data must be refused before anyone is contacted.
    result, seconds = run_script([str(ENVOY), "bad", str(config), "localhost", str(free_port())], tmp_path / "w")
    assert_one_line_error(result, seconds, expected, str(config))
    assert "Starting the Envoy" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "text, expected",
    [
        ("shard_descriptor: [1, 2\n", "malformed YAML at line"),
        ("params: {cuda_devices: []}\n", "setting 'shard_descriptor.template' is missing"),
        (None, "rank_worldsize '3,2'"),
    ],
)
def test_bad_envoy_config_is_one_line_naming_the_file(
    tiny_root: Path, tmp_path: Path, text: str | None, expected: str
) -> None:
    config = tmp_path / "shard.yaml"
    if text is None:
        _shard_config(config, tiny_root, rank_worldsize="3,2")
    else:
        config.write_text(text)
    result, seconds = run_script([str(ENVOY), "bad", str(config), "localhost", str(free_port())], tmp_path / "w")
    assert_one_line_error(result, seconds, f"{config}: ", expected)


def test_wrong_director_port_stops_the_envoy_at_once(tiny_root: Path, tmp_path: Path) -> None:
    port = free_port()
    result, seconds = run_script(
        [str(ENVOY), "lost", str(_shard_config(tmp_path / "c.yaml", tiny_root)), "localhost", str(port)], tmp_path / "w"
    )
    assert result.returncode == 2
    assert f"cannot reach the director at localhost:{port}" in result.stderr


@pytest.mark.parametrize(
    "text, expected",
    [
        ("settings:\n  listen_port: [50050\n", "malformed YAML at line"),
        ("settings: {listen_host: localhost}\n", "setting 'settings.listen_port' is missing"),
        (
            "settings: {listen_host: localhost, listen_port: 80, sample_shape: ['256', '256', '3'], "
            "target_shape: ['256', '256']}\n",
            "listen_port 80 must be a whole number in 1024..65535",
        ),
    ],
)
def test_bad_director_config_is_one_line_naming_the_file(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "director.yaml"
    config.write_text(text)
    result, seconds = run_script([str(DIRECTOR), str(config)], tmp_path / "d")
    assert_one_line_error(result, seconds, f"{config}: ", expected)


@pytest.mark.parametrize("script", ["director_folder/start_director.sh", "envoy_folder/start_envoy.sh"])
def test_no_fx_anywhere_is_one_line(tmp_path: Path, script: str) -> None:
    """A checkout without .venv and no fx on PATH: the script stops at once with what to do, nothing else."""
    import shutil

    for folder in ("scripts", "director_folder", "envoy_folder"):
        shutil.copytree(REPO / folder, tmp_path / "checkout" / folder)
    args = ["x.yaml"] if script.startswith("director") else ["envoy_1", "x.yaml", "localhost", "50051"]
    result, seconds = run_script([str(tmp_path / "checkout" / script), *args], tmp_path / "w", path="/usr/bin:/bin")
    assert_one_line_error(result, seconds, "fx (OpenFL) not found", "make install")


def test_director_refuses_a_shard_of_other_shapes_with_a_sentence(tiny_root: Path, tmp_path: Path) -> None:
    port = free_port()
    config = write_director_config(REPO, tmp_path / "d" / "director_config.yaml", port)
    settings = yaml.safe_load(config.read_text())
    settings["settings"]["sample_shape"] = ["128", "128", "3"]
    config.write_text(yaml.safe_dump(settings))
    with Processes() as processes:
        director = processes.start(
            "director",
            [str(DIRECTOR), str(config)],
            tmp_path / "director.log",
            env={"PATCHSVDD_WORKDIR": str(tmp_path / "d")},
        )
        wait_for(lambda: listens("localhost", port, 1.0), 60, "the director", [director])
        result, seconds = run_script(
            [str(ENVOY), "odd", str(_shard_config(tmp_path / "c.yaml", tiny_root)), "localhost", str(port)],
            tmp_path / "w",
            timeout=120,
        )
    assert result.returncode != 0
    assert "the director refused this shard: the shapes read from the data differ" in result.stderr
