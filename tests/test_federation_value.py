"""The federation-value benchmark end to end on a tiny category: the real director and envoys (start scripts,
a site each of its own folder), the alone and pooled models, exact scoring at every site, the intervals."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from patchsvdd.data.mvtec import index_category
from patchsvdd.federated.local import project_root

pytestmark = pytest.mark.slow


def benchmark():
    path = project_root() / "benchmarks" / "bench_federation_value.py"
    spec = importlib.util.spec_from_file_location("bench_federation_value", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_three_ways_on_the_same_sites_with_a_remedy(tiny_root: Path, tmp_path: Path) -> None:
    argv = ["--scenario", "noniid", "--mvtec-root", str(tiny_root), "--category", "fabric", "--rounds", "1",
            "--steps", "2", "--batch-size", "4", "--draws", "50", "--remedies", "local_heads", "--out",
            str(tmp_path)]  # fmt: skip
    assert benchmark().main(argv) == 0
    result = json.loads((tmp_path / "noniid.json").read_text())
    assert result["train_images"] == [4, 4] and sum(result["test_images"]) == len(
        index_category(tiny_root, "fabric").test
    )
    assert result["pooled_steps_per_round"] == 4  # the federation's total: 2 steps at each of 2 sites
    first, second = result["acquisitions"]
    assert first != second and first["gains"] != [1.0, 1.0, 1.0]  # each site its own camera
    ways = ["alone", "federated", "pooled", "federated local_heads"]
    per_site = [row for row in result["rows"] if row["site"] != "all sites"]
    assert [row["way"] for row in per_site] == ways * 2
    assert [row["way"] for row in result["rows"] if row["site"] == "all sites"] == ways
    for row in result["rows"]:
        assert all(0.0 <= row[key] <= 1.0 for key in ("det_sum", "seg_sum")), row
    for row in per_site:
        assert row["det_low"] <= row["det_sum"] <= row["det_high"]
    alone, federated = per_site[0], per_site[1]
    assert alone["seg_sum"] != federated["seg_sum"]  # different models, scored on the same images
    assert [g["difference"] for g in result["gains"][:3]] == [
        "federated - alone",
        "pooled - federated",
        "federated local_heads - federated",
    ]
    assert set(result["seconds"]) >= {"alone", "federated", "pooled", "scoring", "federated local_heads"}
    assert (tmp_path / "noniid.png").stat().st_size > 0 and "| site |" in (tmp_path / "noniid.md").read_text()
