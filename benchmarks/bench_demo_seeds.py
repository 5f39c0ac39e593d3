"""How much do the demo's AUROCs depend on the draw of its data? The untrained encoder on several data seeds.

    python benchmarks/bench_demo_seeds.py [--seeds 0 1 2] [--test-good 100] [--test-per-defect 50]
        [--out runs/bench_demo_seeds]

Generates the demo category (washer, 60 training images) once per seed with
the given test-set size (the demo: 40 good and 20 per defect type, i.e. 20 good
and 40 defective per envoy), and scores each of the two envoys' shards with the
demo's initial model (seed 0, He initialisation; fast search, as the per-round
validation), and both shards' images together ("pooled": each image scored
against its own envoy's bank, ranked together, as the demo's pooled row). The
spread over seeds of the same untrained model is what the draw of the data
alone moves a demo figure by. Beside each envoy's det_sum the table gives the
standard error an AUROC of that size has from its test set alone (Hanley and
McNeil, 1982), the least spread any number of seeds can show. Prints a table
and the range per metric; writes ``seeds.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHOWN = ("det_sum", "seg_sum", "det_64", "seg_64", "det_32", "seg_32")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-good", type=int, default=100, help="good test images (both envoys together)")
    parser.add_argument("--test-per-defect", type=int, default=50, help="test images per defect type (both envoys)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_demo_seeds")
    args = parser.parse_args()
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from patchsvdd.data import index_category, load_category
    from patchsvdd.evaluate import evaluate_category
    from patchsvdd.metrics import auroc_standard_error
    from patchsvdd.models import build_model
    from patchsvdd.settings import DEMO_SETTINGS
    from patchsvdd.synth import generate_category

    torch.manual_seed(DEMO_SETTINGS.seed)
    model = build_model(DEMO_SETTINGS.model, emb_dim=DEMO_SETTINGS.emb_dim, init=DEMO_SETTINGS.init).eval()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as root:
            generate_category(root, "washer", seed=seed, n_train=60, n_test_good=args.test_good,
                              n_test_per_defect=args.test_per_defect)
            scores, labels = [], []
            for rank in (1, 2):
                data = load_category(index_category(root, "washer").shard(rank, 2))
                evaluation = evaluate_category(model, data, mode="fast", with_aupro=False)
                scores.append(evaluation.scores.image_scores("sum").numpy())
                labels.append(np.asarray(data.test_labels))
                n_anomalous = int(np.sum(data.test_labels))
                det_sum = evaluation.metrics["det_sum"]
                rows.append({"seed": seed, "envoy": str(rank), "test_images": len(data.test_labels),
                             **{key: evaluation.metrics[key] for key in SHOWN},
                             "se_det_sum": auroc_standard_error(det_sum, len(data.test_labels) - n_anomalous,
                                                                n_anomalous)})
                print(rows[-1], flush=True)
            pooled = roc_auc_score(np.concatenate(labels), np.concatenate(scores))
            rows.append({"seed": seed, "envoy": "pooled", "test_images": sum(map(len, labels)), "det_sum": pooled})
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds.json").write_text(json.dumps(rows, indent=1))
    columns = ("det_sum", "se_det_sum", *SHOWN[1:])
    print(f"\n| data seed | envoy | test images | {' | '.join(columns)} |\n|{'---|' * (3 + len(columns))}")
    for row in rows:
        print(f"| {row['seed']} | {row['envoy']} | {row['test_images']} | "
              + " | ".join(f"{row[k]:.4f}" if k in row else "" for k in columns) + " |")
    envoys = [row for row in rows if row["envoy"] != "pooled"]
    print("| range, envoys | | | " + " | ".join(f"{min(r[k] for r in envoys):.3f}-{max(r[k] for r in envoys):.3f}"
                                             for k in columns) + " |")
    pooled = [row["det_sum"] for row in rows if row["envoy"] == "pooled"]
    print(f"| range, pooled | | | {min(pooled):.3f}-{max(pooled):.3f} |")


if __name__ == "__main__":
    main()
