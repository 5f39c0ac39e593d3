"""The demo's choice of starting model (fresh, released, a checkpoint) and its parser defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from patchsvdd.cli.demo import build_parser, demo_settings, initial_checkpoint
from patchsvdd.cli.demo_summary import budget_note
from patchsvdd.errors import SettingsError
from patchsvdd.models.patchsvdd.network import PatchSVDD
from patchsvdd.models.patchsvdd.released import SHA256, ReleasedWeightsError
from patchsvdd.settings import DEMO_SETTINGS, FINETUNE, LEARN_BUDGET
from patchsvdd.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

OFFICIAL = Path(
    os.environ.get("PATCHSVDD_SHARED_OFFICIAL", Path(__file__).resolve().parents[2] / "shared" / "official")
)


def test_fresh_and_project_checkpoints(tmp_path: Path) -> None:
    assert initial_checkpoint("fresh", "washer", tmp_path) is None
    ckpt = save_checkpoint(PatchSVDD(emb_dim=16), tmp_path / "start.pt", round=3)
    assert initial_checkpoint(str(ckpt), "washer", tmp_path) == ckpt.resolve()
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt: not a readable checkpoint"):
        initial_checkpoint(str(tmp_path / "broken.pt"), "washer", tmp_path)
    with pytest.raises(ReleasedWeightsError, match="category 'washer'"):  # no released encoder for demo data
        initial_checkpoint("official", "washer", tmp_path)


def test_the_released_encoder_is_imported_into_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    official = OFFICIAL / "bottle_enchier.pkl"
    if not official.is_file():
        pytest.skip(f"released bottle encoder not found at {official}")
    path = initial_checkpoint(str(official), "bottle", tmp_path)
    model, meta = load_checkpoint(path)
    assert path == tmp_path / "initial.pt" and meta["imported"]["sha256"] == SHA256["bottle"]
    released = torch.load(official, map_location="cpu", weights_only=True)
    assert torch.equal(model.encoder.combine.weight, released["conv1.weight"])
    # 'official' takes the pinned file from the cache without any network
    monkeypatch.setenv("PATCHSVDD_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "released" / "bottle" / "enchier.pkl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(official.read_bytes())
    assert load_checkpoint(initial_checkpoint("official", "bottle", tmp_path / "run2"))[1]["imported"]["pinned"]


def test_parser_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INIT", "official")
    monkeypatch.setenv("MAX_STEPS", "7")
    args = build_parser().parse_args([])
    assert args.init == "official" and args.max_steps == 7 and args.lr is None  # lr: chosen by init
    tuned = demo_settings(args)
    assert tuned.max_steps == 7 and tuned.lr < DEMO_SETTINGS.lr and tuned.warmup_steps == 0
    fresh = demo_settings(build_parser().parse_args(["--init", "fresh", "--lr", "0.002"]))
    assert fresh.lr == 0.002 and fresh.warmup_steps == DEMO_SETTINGS.warmup_steps
    assert (fresh.max_steps, fresh.repeat) == (7, DEMO_SETTINGS.repeat)
    monkeypatch.delenv("MAX_STEPS")
    fresh, tuned = (demo_settings(build_parser().parse_args(["--init", init])) for init in ("fresh", "official"))
    assert (fresh.max_steps, fresh.repeat) == (DEMO_SETTINGS.max_steps, DEMO_SETTINGS.repeat)
    assert (
        (tuned.max_steps, tuned.repeat)
        == (FINETUNE["max_steps"], FINETUNE["repeat"])
        != (fresh.max_steps, fresh.repeat)
    )
    full = demo_settings(build_parser().parse_args(["--init", "official", "--max-steps", "0", "--repeat", "3"]))
    assert (full.max_steps, full.repeat, full.lr) == (None, 3, FINETUNE["lr"])
    assert demo_settings(build_parser().parse_args([])).seed == DEMO_SETTINGS.seed == 0
    monkeypatch.setenv("SEED", "2")  # the training seed: initial model and batches
    assert demo_settings(build_parser().parse_args([])).seed == 2
    assert demo_settings(build_parser().parse_args(["--seed", "1"])).seed == 1


def test_learn_runs_the_budget_that_learns_and_fine_tuning_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    quick = demo_settings(build_parser().parse_args([]))
    assert (quick.rounds, quick.repeat, quick.max_steps) == (DEMO_SETTINGS.rounds, DEMO_SETTINGS.repeat, 40)
    learn = demo_settings(build_parser().parse_args(["--learn"]))
    assert {key: getattr(learn, key) for key in LEARN_BUDGET} == LEARN_BUDGET
    assert demo_settings(build_parser().parse_args(["--learn", "--rounds", "2"])).rounds == 2  # an option wins
    monkeypatch.setenv("LEARN", "1")
    assert demo_settings(build_parser().parse_args([])).max_steps == LEARN_BUDGET["max_steps"]
    tuned = demo_settings(build_parser().parse_args(["--init", "official"]))
    assert (tuned.rounds, tuned.max_steps) == (FINETUNE["rounds"], FINETUNE["max_steps"])


def test_secure_aggregation_is_a_flower_demo_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SECAGG", raising=False)
    assert not demo_settings(build_parser().parse_args(["--engine", "flower"])).secure_aggregation
    assert demo_settings(build_parser().parse_args(["--engine", "flower", "--secure-aggregation"])).secure_aggregation
    monkeypatch.setenv("SECAGG", "1")
    assert demo_settings(build_parser().parse_args(["--engine", "flower"])).secure_aggregation
    with pytest.raises(SettingsError, match="secure aggregation runs on Flower only"):
        demo_settings(build_parser().parse_args(["--engine", "openfl"]))


def test_harness_finds_the_project_or_says_how(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from patchsvdd.federated import local as harness

    root = Path(__file__).resolve().parents[1]
    monkeypatch.delenv("PATCHSVDD_ROOT", raising=False)
    assert harness.project_root(root / "workspace") == root  # from a folder inside the checkout
    monkeypatch.setattr(harness, "__file__", str(tmp_path / "site-packages" / "patchsvdd" / "harness.py"))
    with pytest.raises(harness.HarnessError, match="set PATCHSVDD_ROOT"):  # an installed package, run elsewhere
        harness.project_root(tmp_path)
    monkeypatch.setenv("PATCHSVDD_ROOT", str(root))
    assert harness.project_root(tmp_path) == root


@pytest.mark.slow
def test_a_non_editable_install_runs_the_demo_parts_from_a_checkout(tmp_path: Path) -> None:
    """``pip install .`` copies the package away from the checkout: the harness still finds the scripts."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    source, target = tmp_path / "source", tmp_path / "site"  # a copy: the build leaves build/ beside its source
    shutil.copytree(root / "patchsvdd", source / "patchsvdd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    probe = (
        "import patchsvdd, patchsvdd.cli.demo as d, patchsvdd.federated.local as h; "
        "print(patchsvdd.__file__); print(h.project_root()); "
        "print(d.demo_settings(d.build_parser().parse_args([])).rounds)"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)}
    inside = subprocess.run(
        [sys.executable, "-c", probe], cwd=root / "envoy_folder", env=env, capture_output=True, text=True, timeout=120
    )
    assert inside.returncode == 0, inside.stderr
    package, found, rounds = inside.stdout.split()
    assert package.startswith(str(target)) and Path(found) == root and int(rounds) == 2
    outside = subprocess.run(
        [sys.executable, "-m", "patchsvdd.cli.demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert outside.returncode == 2 and "set PATCHSVDD_ROOT" in outside.stderr and "Traceback" not in outside.stderr


def test_empty_or_bad_environment_numbers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("ROUNDS", "")  # ROUNDS= make demo: the default, not a crash
    assert demo_settings(build_parser().parse_args([])).rounds == DEMO_SETTINGS.rounds
    monkeypatch.setenv("ROUNDS", "five")
    with pytest.raises(SystemExit, match="ROUNDS='five': expected a whole number"):
        build_parser()
    monkeypatch.setenv("ROUNDS", "0")
    from patchsvdd.cli.demo import main

    with pytest.raises(SystemExit) as stopped:  # before any folder, data or process
        main(["--runs-dir", str(tmp_path / "runs")])
    assert stopped.value.code == 2 and "rounds=0: at least one round" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_demo_data_are_made_again_when_their_version_or_sizes_change(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import json

    import patchsvdd.cli.demo as demo
    from patchsvdd.data.synth import MARKER, SYNTH_VERSION, generated_with
    from patchsvdd.settings import DEMO_DATA

    assert DEMO_DATA["n_test_good"] // 2 >= 20 and DEMO_DATA["n_test_per_defect"] * 4 // 2 >= 40  # per envoy
    small = {"seed": 0, "n_train": 2, "n_test_good": 1, "n_test_per_defect": 1, "image_size": 256}
    monkeypatch.setattr(demo, "DEMO_DATA", small)
    folder = tmp_path / "washer"
    demo.ensure_demo_data(tmp_path, "washer")
    assert generated_with(folder) == {"version": SYNTH_VERSION, **small} and "generating" in capsys.readouterr().out
    demo.ensure_demo_data(tmp_path, "washer")
    assert "generating" not in capsys.readouterr().out  # the same data: kept
    monkeypatch.setattr(demo, "DEMO_DATA", {**small, "n_test_good": 3})
    demo.ensure_demo_data(tmp_path, "washer")
    assert len(list((folder / "test" / "good").glob("*.png"))) == 3
    marker = json.loads((folder / MARKER).read_text())
    (folder / MARKER).write_text(json.dumps({**marker, "version": SYNTH_VERSION - 1}))
    demo.ensure_demo_data(tmp_path, "washer")
    assert "generating" in capsys.readouterr().out and generated_with(folder)["version"] == SYNTH_VERSION
    (folder / MARKER).write_text("not json")
    assert generated_with(folder) is None and generated_with(tmp_path / "nowhere") is None


def test_a_first_run_says_it_is_too_short_to_learn() -> None:
    quick = demo_settings(build_parser().parse_args([]))
    note = budget_note(quick)
    assert note is not None and "80 steps per envoy" in note and "1200 steps" in note and "make demo-learn" in note
    assert budget_note(demo_settings(build_parser().parse_args(["--learn"]))) is None
    assert budget_note(demo_settings(build_parser().parse_args(["--init", "official"]))) is None  # fine-tuning
    assert budget_note(demo_settings(build_parser().parse_args(["--model", "autoencoder"]))) is None
