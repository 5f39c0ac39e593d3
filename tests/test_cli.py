"""The command line end to end: synth -> train (short) -> evaluate, and its errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from patchsvdd.cli.main import main
from patchsvdd.evaluation.metrics import AUPRO_KEYS, METRIC_KEYS


def _train_tiny(root: Path, category: str, out: Path) -> None:
    """One training step of a D=16 model: a checkpoint to test the commands after train with."""
    assert (
        main(
            [
                "train",
                "--data-root",
                str(root),
                "--category",
                category,
                "--epochs",
                "1",
                "--repeat",
                "1",
                "--batch-size",
                "4",
                "--max-steps",
                "1",
                "--emb-dim",
                "16",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )


@pytest.mark.slow
def test_synth_train_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    assert (
        main(
            [
                "synth",
                "--out",
                str(root),
                "--category",
                "washer",
                "--seed",
                "4",
                "--n-train",
                "6",
                "--n-test-good",
                "2",
                "--n-test-per-defect",
                "1",
                "--image-size",
                "272",
            ]
        )
        == 0
    )
    ckpt = tmp_path / "model.pt"
    assert (
        main(
            [
                "train",
                "--data-root",
                str(root),
                "--category",
                "washer",
                "--epochs",
                "2",
                "--repeat",
                "1",
                "--batch-size",
                "4",
                "--max-steps",
                "1",
                "--emb-dim",
                "16",
                "--out",
                str(ckpt),
                "--no-progress",
            ]
        )
        == 0
    )
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--data-root",
                str(root),
                "--category",
                "washer",
                "--checkpoint",
                str(ckpt),
                "--out-dir",
                str(out),
                "--search",
                "fast",
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads((out / "metrics.json").read_text())
    assert all(0.0 <= report[k] <= 1.0 for k in METRIC_KEYS + AUPRO_KEYS)
    defects = report["per_defect"]["sum"]
    assert list(defects) == ["good", "crack", "missing", "scratch", "stain"]
    assert defects["good"]["n"] == 2 and "auroc" not in defects["good"]
    assert defects["crack"]["n"] == 1 and 0.0 <= defects["crack"]["auroc"] <= 1.0
    assert report["n_train"] == 6 and report["n_test"] == 6 and report["search"] == "fast"
    assert report["checkpoint_metadata"]["epochs"] == 2
    assert {"embed", "search_64", "search_32", "total"} <= set(report["seconds"])
    assert (out / "roc.png").is_file()
    assert sorted(p.name for p in (out / "maps").glob("*.png"))[:2] == ["crack_000.png", "good_000.png"]
    printed = capsys.readouterr().out
    assert "det_sum" in printed and "epoch 2/2" in printed and "image scores (sum) per defect type" in printed


@pytest.mark.slow
def test_evaluate_all_categories_reports_each_and_goes_on_after_a_failure(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt_dir = tmp_path / "ckpts"
    _train_tiny(tiny_root, "fabric", ckpt_dir / "fabric.pt")
    out = tmp_path / "all"
    # mesh has no mesh.pt: it fails with the reason, fabric is still evaluated and tabled
    assert (
        main(
            [
                "evaluate",
                "--data-root",
                str(tiny_root),
                "--category",
                "all",
                "--checkpoint-dir",
                str(ckpt_dir),
                "--out-dir",
                str(out),
                "--search",
                "exact",
                "--no-progress",
                "--no-gallery",
            ]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert "[1/2] fabric" in captured.out and "[2/2] mesh" in captured.out
    assert "mesh failed: CheckpointError" in captured.err and "mesh.pt: checkpoint file not found" in captured.err
    rows = {row["category"]: row for row in csv.DictReader(open(out / "results.csv"))}
    assert list(rows) == ["fabric", "mesh", "mean"]
    assert rows["fabric"]["status"] == "ok" and rows["mesh"]["status"].startswith("failed: CheckpointError")
    fabric = json.loads((out / "fabric" / "metrics.json").read_text())
    assert float(rows["fabric"]["det_sum"]) == pytest.approx(fabric["det_sum"])
    assert float(rows["mean"]["det_sum"]) == pytest.approx(fabric["det_sum"])  # the mean of what succeeded
    assert rows["mesh"]["det_sum"] == "" and rows["fabric"]["paper_det"] == ""  # no paper figure for fabric
    markdown = (out / "results.md").read_text()
    assert "| fabric |" in markdown and "**mean**" in markdown and "1 of 2 categories" in markdown
    assert (out / "results.png").stat().st_size > 1000
    # one checkpoint for every category: both succeed
    assert (
        main(
            [
                "evaluate",
                "--data-root",
                str(tiny_root),
                "--category",
                "all",
                "--checkpoint",
                str(ckpt_dir / "fabric.pt"),
                "--out-dir",
                str(tmp_path / "one"),
                "--no-progress",
                "--no-gallery",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "one" / "results.csv")))
    assert [row["status"] for row in rows] == ["ok", "ok", "2 of 2 categories"]


def test_synth_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    from PIL import Image

    for name in ("a", "b"):
        main(
            [
                "synth",
                "--out",
                str(tmp_path / name),
                "--category",
                "mesh",
                "--seed",
                "2",
                "--n-train",
                "1",
                "--n-test-good",
                "1",
                "--n-test-per-defect",
                "1",
                "--image-size",
                "260",
            ]
        )
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 1 + 1 + 4 * 2
    for rel in files:
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "a" / rel)), np.asarray(Image.open(tmp_path / "b" / rel))
        )
    with Image.open(tmp_path / "a" / "mesh" / "train" / "good" / "000.png") as img:
        assert img.mode == "L" and img.size == (260, 260)


def test_demo_washer_fills_the_frame_and_its_defects_lie_on_it(tmp_path: Path) -> None:
    """Demo data version 3: most of each image is the washer (on the table the position task has nothing
    to learn), and every defect mask is non-empty and on the metal, not on the table."""
    from PIL import Image

    main(
        [
            "synth",
            "--out",
            str(tmp_path),
            "--category",
            "washer",
            "--seed",
            "1",
            "--n-train",
            "2",
            "--n-test-good",
            "1",
            "--n-test-per-defect",
            "3",
        ]
    )
    root = tmp_path / "washer"

    def metal(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("L")) > 0.3 * 255  # table about 0.16, metal above 0.5

    for path in root.glob("train/good/*.png"):
        assert 0.55 < metal(path).mean() < 0.75, path  # version 2 had 0.37
    washer = metal(root / "train" / "good" / "000.png")
    for mask_path in root.glob("ground_truth/*/*_mask.png"):
        mask = np.asarray(Image.open(mask_path)) > 0
        assert mask.any(), mask_path
        assert (mask & washer).sum() / mask.sum() > 0.5, mask_path


def test_bad_input_gives_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "evaluate",
                "--data-root",
                str(tmp_path),
                "--category",
                "x",
                "--checkpoint",
                str(tmp_path / "no.pt"),
                "--out-dir",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "no.pt: checkpoint file not found" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--data-root",
                str(tmp_path / "none"),
                "--category",
                "x",
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "m.pt"),
            ]
        )
        == 2
    )
    assert "data root does not exist" in capsys.readouterr().err
    for bad, text in (
        (["--epochs", "1", "--batch-size", "0"], "--batch-size: 0: must be at least 1"),
        (["--epochs", "-1"], "--epochs: -1: must be at least 0"),
        (["--epochs", "x"], "'x' is not a whole"),
        (["--epochs", "1", "--lr", "0"], "lr=0"),
        (["--epochs", "1", "--emb-dim", "0"], "emb_dim=0: from 1 to 4096"),
        (["--epochs", "1", "--init", "xavier"], "invalid choice: 'xavier'"),
        (["--epochs", "1", "--model", "autoencoder", "--emb-dim", "8"], "--emb-dim: not an option of autoencoder"),
        (["--epochs", "1", "--latent-dim", "8"], "--latent-dim: not an option of patchsvdd"),
    ):
        assert (
            _exit_code(
                ["train", "--data-root", str(tmp_path), "--category", "x", "--out", str(tmp_path / "m.pt"), *bad]
            )
            == 2
        )
        assert text in capsys.readouterr().err  # said before any data is read (there are none here)
    assert _exit_code(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "--port: 70000: must be at most 65535" in capsys.readouterr().err
    assert _exit_code(["synth", "--out", str(tmp_path / "s"), "--n-train", "0"]) == 2
    assert "--n-train: 0: must be at least 1" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_synth_defaults_are_the_demos_data() -> None:
    from patchsvdd.cli.main import build_parser
    from patchsvdd.settings import DEMO_DATA

    args = build_parser().parse_args(["synth", "--out", "x", "--category", "washer"])
    assert {key: getattr(args, key) for key in DEMO_DATA} == DEMO_DATA  # what make demo would generate


def _exit_code(argv: list[str]) -> int:
    """main's return value, or the code of the SystemExit argparse raises for a malformed argument."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only a user's mistake (InputError) becomes one line; any other error is a bug and propagates."""
    from patchsvdd.cli import make_commands

    def broken(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(make_commands, "cmd_synth", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["synth", "--out", str(tmp_path / "s")])


def test_help_shows_defaults_and_no_markup(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["train", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "(default: 0)" in shown and "--recipe" in shown and "(default: None)" not in shown
    assert _exit_code(["--help"]) == 0
    assert "``" not in capsys.readouterr().out


def test_train_recipes(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from patchsvdd.training.checkpoint import load_checkpoint

    ckpt = tmp_path / "paper.pt"
    assert (
        main(
            [
                "train",
                "--data-root",
                str(tiny_root),
                "--category",
                "mesh",
                "--epochs",
                "1",
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--recipe",
                "paper",
                "--warmup-steps",
                "5",
                "--emb-dim",
                "8",
                "--out",
                str(ckpt),
                "--no-progress",
            ]
        )
        == 0
    )
    _, meta = load_checkpoint(ckpt)
    assert meta["recipe"] == "paper"
    assert meta["settings"] == {
        "lr": 1e-4,
        "batch_size": 2,
        "repeat": 100,
        "warmup_steps": 5,
        "schedule": "constant",
        "precision": "fp32",
    }
    assert meta["model_options"] == {"emb_dim": 8, "init": "pytorch", "lambda_svdd": 1e-3}  # the paper's init
    assert meta["history"][0]["spread_32"] < 1e-3  # PyTorch's init: nearly constant embeddings
    assert "(chance 2.079)" in capsys.readouterr().out


@pytest.mark.slow
def test_export_then_predict_a_folder(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "model.pt"
    _train_tiny(tiny_root, "fabric", ckpt)
    bundle = tmp_path / "bundle"
    assert (
        main(
            [
                "export",
                "--data-root",
                str(tiny_root),
                "--category",
                "fabric",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(bundle),
                "--bank-fraction",
                "0.5",
                "--no-progress",
            ]
        )
        == 0
    )
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["bank_fraction"] == 0.5 and len(info["source_sha256"]) == 64 and info["category"] == "fabric"
    calibration = (bundle / "calibration.md").read_text()
    assert "| image |" in calibration and "| pixel |" in calibration and "| crack |" in calibration
    assert (bundle / "roc.png").is_file()
    capsys.readouterr()
    out = tmp_path / "pred"
    folder = tiny_root / "fabric" / "test"
    assert main(["predict", str(bundle), str(folder), "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == len(list(folder.rglob("*.png"))) == len(list(out.glob("*.png")))
    threshold = info["image_threshold"]["value"]
    for row in rows:
        assert (float(row["score"]) >= threshold) == (row["anomalous"] == "1")
        assert 0.0 <= float(row["normalized_score"]) <= 1.0
    assert f"{len(rows)} images" in capsys.readouterr().out
    # bad input: one line naming what is wrong, exit 2
    assert main(["predict", str(tmp_path / "nowhere"), str(folder), "--out", str(out)]) == 2
    assert "bundle.json: not found" in capsys.readouterr().err
    assert main(["predict", str(bundle), str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert "missing.png: no such file or folder" in capsys.readouterr().err
    export = ["export", "--data-root", str(tiny_root), "--category", "fabric", "--checkpoint", str(ckpt)]
    with pytest.raises(SystemExit) as refused:
        main([*export, "--out", str(bundle), "--bank-fraction", "0"])
    assert refused.value.code == 2 and "the share must be in (0, 1]" in capsys.readouterr().err
    # the default bank: the smallest k-center bank within 0.005 AUROC of the full one, measured and written down
    assert main([*export, "--out", str(tmp_path / "auto"), "--no-progress"]) == 0
    auto = json.loads((tmp_path / "auto" / "bundle.json").read_text())
    written = (tmp_path / "auto" / "calibration.md").read_text()
    assert "--bank-fraction auto kept the smallest k-center bank" in written and "| det_auroc |" in written
    chosen = next(line for line in written.splitlines() if line.rstrip().endswith("| yes |"))
    assert auto["bank_fraction"] == float(chosen.split("|")[1]) and str(auto["bank_rows"]["32"]) in chosen


def test_python_dash_m_runs_the_command_line() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "patchsvdd", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "export" in result.stdout and "serve" in result.stdout
