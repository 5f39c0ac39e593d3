"""The three steps README's "Start it by hand" gives, exactly: on a copy of the project as a fresh clone has it
(after ``make install``, which writes the demo data the shipped configs name),

    director_folder/start_director.sh
    cd envoy_folder && ./start_envoy.sh env_one shard_config.yaml
    cd envoy_folder && ./start_envoy.sh env_two shard_config_two.yaml
    the notebook workspace/PatchSVDD_with_Director.ipynb with its default parameters

through the real scripts, with the shipped configs and the default ports, waiting on readiness only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from patchsvdd.cli.demo import NOTEBOOK, ensure_demo_data, run_notebook
from patchsvdd.federated.local import Processes, project_root, wait_for
from patchsvdd.federated.openfl.local import envoys_accepted
from patchsvdd.system.probes import listens

pytestmark = pytest.mark.slow
ENVOYS = {"env_one": "shard_config.yaml", "env_two": "shard_config_two.yaml"}


def _fresh_copy(tmp_path: Path) -> Path:
    """The project's files (tracked and not ignored) and the demo data, in a folder of their own, so that
    what the scripts and the notebook write in their default folders stays out of the checkout."""
    root = project_root()
    ensure_demo_data(root / "data" / "demo", "washer")  # what make install does
    copy = tmp_path / "project"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell the project's files from what runs left")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (root / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, copy / name)
    shutil.copytree(root / "data" / "demo", copy / "data" / "demo")
    return copy


def test_the_shipped_configs_the_notebook_and_the_demo_data_agree(notebook_parameters: dict) -> None:
    root = project_root()
    director = yaml.safe_load((root / "director_folder" / "director_config.yaml").read_text())["settings"]
    assert director["listen_port"] == notebook_parameters["director_port"]
    assert notebook_parameters["expected_envoys"] == len(ENVOYS)
    for rank, config in enumerate(ENVOYS.values(), start=1):
        params = yaml.safe_load((root / "envoy_folder" / config).read_text())["shard_descriptor"]["params"]
        assert params["category"] == notebook_parameters["category"] == "washer"
        assert (root / "envoy_folder" / params["data_folder"]).resolve() == root / "data" / "demo"
        assert params["rank_worldsize"] == f"{rank},{len(ENVOYS)}"


@pytest.mark.timeout(1800)
def test_the_three_steps_as_written(tmp_path: Path, notebook_parameters: dict) -> None:
    ports = (notebook_parameters["director_port"], notebook_parameters["aggregator_port"])
    busy = [port for port in ports if listens("localhost", port, timeout=0.5)]
    if busy:
        pytest.skip(f"port {busy[0]} is in use here, and the three steps use the default ports {ports}")
    project = _fresh_copy(tmp_path)
    logs = tmp_path / "logs"
    with Processes() as processes:
        director = processes.start(
            "director", ["director_folder/start_director.sh"], logs / "director.log", cwd=project
        )
        wait_for(lambda: listens("localhost", ports[0], timeout=1.0), 120, "the director to listen", [director])
        envoys = [
            processes.start(
                name, ["./start_envoy.sh", name, config], logs / f"{name}.log", cwd=project / "envoy_folder"
            )
            for name, config in ENVOYS.items()
        ]
        wait_for(
            envoys_accepted("localhost", ports[0], list(ENVOYS), {"tls": False}),
            180,
            "the director to list env_one and env_two online",
            [director, *envoys],
            poll=1.0,
        )
        run_notebook(project / NOTEBOOK, tmp_path / "executed.ipynb", {}, timeout=1500, cwd=project / "workspace")
    results = project / "runs" / "notebook"
    metrics = json.loads((results / "metrics.json").read_text())
    assert set(metrics["per_node"]) == {"env_one", "env_two", "aggregator", "pooled"}
    assert all(0 <= value <= 1 for value in metrics["per_node"]["pooled"].values())
    learning = {row["node"]: row for row in json.loads((results / "learning.json").read_text())}
    assert set(learning) >= {"env_one", "env_two", "aggregator"}
    bundles = json.loads((results / "bundles.json").read_text())
    for row, site in zip(bundles, ("site_1", "site_2")):  # each envoy wrote its bundle where its config says
        assert Path(row["bundle at the site"]).parent == project / "envoy_folder" / "bundles" / site
        assert (Path(row["bundle at the site"]) / "bundle.json").is_file()
    executed = (tmp_path / "executed.ipynb").read_text()
    assert "round 0/" in executed and "heldout_pos" in executed  # one line per round
