"""How much do the demo's AUROCs depend on the draw of its data? The untrained encoder, and optionally a
trained one, on several data seeds.

    python benchmarks/bench_demo_seeds.py [--seeds 0 1 2] [--test-good 100] [--test-per-defect 50]
        [--checkpoint runs/<time>/notebook/best.pt] [--out runs/bench_demo_seeds]

Generates the demo category (washer, ``settings.DEMO_DATA`` but for the seed)
once per seed with the given test-set size (the demo's by default: 100 good and
50 per defect type, i.e. 50 good and 100 defective per envoy), and scores each of the two envoys' shards with the
demo's initial model (seed 0, He initialisation; fast search, as the per-round
validation), and both shards' images together ("pooled": each image scored
against its own envoy's bank, ranked together, as the demo's pooled row). The
spread over seeds of the same untrained model is what the draw of the data
alone moves a demo figure by. Beside each envoy's det_sum the table gives the
standard error an AUROC of that size has from its test set alone (Hanley and
McNeil, 1982), the least spread any number of seeds can show.

``--checkpoint`` (e.g. the demo's ``best.pt``, trained on seed 0's training
images) scores that model on the same shards too, and gives the gain in
det_sum over the untrained encoder on the same test images with a paired
bootstrap 95 % interval (test images resampled within each class, both models
scored on each resample). Seeds other than the training data's are data the
model has not seen, drawn from the same generator. Prints a table and the
range per metric; writes ``seeds.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from patchsvdd.settings import DEMO_DATA

REPO = Path(__file__).resolve().parents[1]
SHOWN = ("det_sum", "seg_sum", "det_64", "seg_64", "det_32", "seg_32")
BOOTSTRAP = 2000


def paired_gain_interval(
    labels: np.ndarray, before: np.ndarray, after: np.ndarray, seed: int = 0
) -> tuple[float, float]:
    """2.5 and 97.5 percentiles of AUROC(after) - AUROC(before) over bootstrap resamples of the test images
    (labels (N,) 0/1, image scores (N,) of both models), resampled within each class."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    gains = np.empty(BOOTSTRAP)
    for b in range(BOOTSTRAP):
        pick = np.concatenate([rng.choice(good, good.size), rng.choice(bad, bad.size)])
        gains[b] = roc_auc_score(labels[pick], after[pick]) - roc_auc_score(labels[pick], before[pick])
    low, high = np.percentile(gains, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--test-good", type=int, default=DEMO_DATA["n_test_good"], help="good test images (both envoys together)"
    )
    parser.add_argument(
        "--test-per-defect",
        type=int,
        default=DEMO_DATA["n_test_per_defect"],
        help="test images per defect type (both envoys)",
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="a trained model to score beside the untrained one"
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_demo_seeds")
    args = parser.parse_args()
    import torch
    from sklearn.metrics import roc_auc_score

    from patchsvdd.data.mvtec import index_category, load_category
    from patchsvdd.data.synth import generate_category
    from patchsvdd.evaluation.evaluate import evaluate_category
    from patchsvdd.evaluation.metrics import auroc_standard_error
    from patchsvdd.models.registry import build_model
    from patchsvdd.settings import DEMO_SETTINGS
    from patchsvdd.training.checkpoint import load_checkpoint

    torch.manual_seed(DEMO_SETTINGS.seed)
    models = {"untrained": build_model(DEMO_SETTINGS.model, **DEMO_SETTINGS.model_options).eval()}
    if args.checkpoint is not None:
        models["trained"] = load_checkpoint(args.checkpoint)[0].eval()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as root:
            generate_category(
                root,
                "washer",
                **{**DEMO_DATA, "seed": seed, "n_test_good": args.test_good, "n_test_per_defect": args.test_per_defect},
            )
            scores: dict[str, list[np.ndarray]] = {name: [] for name in models}
            labels = []
            made: dict[tuple[str, str], dict] = {}  # (envoy, model) -> this seed's row
            for rank in (1, 2):
                data = load_category(index_category(root, "washer").shard(rank, 2))
                truth = np.asarray(data.test_labels)
                labels.append(truth)
                n_anomalous = int(truth.sum())
                for name, model in models.items():
                    evaluation = evaluate_category(model, data, mode="fast", with_aupro=False)
                    scores[name].append(evaluation.scores.image_scores("sum").numpy())
                    det_sum = evaluation.metrics["det_sum"]
                    made[str(rank), name] = {
                        "seed": seed,
                        "envoy": str(rank),
                        "model": name,
                        "test_images": len(truth),
                        **{key: evaluation.metrics[key] for key in SHOWN},
                        "se_det_sum": auroc_standard_error(det_sum, len(truth) - n_anomalous, n_anomalous),
                    }
                    print(made[str(rank), name], flush=True)
            sets = {str(rank): (labels[rank - 1], {name: scores[name][rank - 1] for name in models}) for rank in (1, 2)}
            sets["pooled"] = (np.concatenate(labels), {name: np.concatenate(scores[name]) for name in models})
            truth, by_model = sets["pooled"]
            for name in models:
                made["pooled", name] = {
                    "seed": seed,
                    "envoy": "pooled",
                    "model": name,
                    "test_images": truth.size,
                    "det_sum": roc_auc_score(truth, by_model[name]),
                }
                print(made["pooled", name], flush=True)
            if "trained" in models:
                for envoy, (truth, by_model) in sets.items():
                    trained, untrained = made[envoy, "trained"], made[envoy, "untrained"]
                    trained["gain_det_sum"] = trained["det_sum"] - untrained["det_sum"]
                    trained["gain_low"], trained["gain_high"] = paired_gain_interval(
                        truth, by_model["untrained"], by_model["trained"], seed
                    )
            rows += made.values()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds.json").write_text(json.dumps(rows, indent=1))
    columns = (
        "det_sum",
        "se_det_sum",
        *(("gain_det_sum", "gain_low", "gain_high") if "trained" in models else ()),
        *SHOWN[1:],
    )
    print(f"\n| data seed | envoy | model | test images | {' | '.join(columns)} |\n|{'---|' * (4 + len(columns))}")
    for row in rows:
        print(
            f"| {row['seed']} | {row['envoy']} | {row['model']} | {row['test_images']} | "
            + " | ".join(f"{row[k]:.4f}" if k in row else "" for k in columns)
            + " |"
        )
    for name in models:
        envoys = [row for row in rows if row["envoy"] != "pooled" and row["model"] == name]
        print(
            f"| range, envoys | | {name} | | "
            + " | ".join(
                f"{min(r[k] for r in envoys):.3f}-{max(r[k] for r in envoys):.3f}" if k in envoys[0] else ""
                for k in columns
            )
            + " |"
        )
        pooled = [row["det_sum"] for row in rows if row["envoy"] == "pooled" and row["model"] == name]
        print(f"| range, pooled | | {name} | | {min(pooled):.3f}-{max(pooled):.3f} |")


if __name__ == "__main__":
    main()
