"""Writes workspace/PatchSVDD_with_Director.ipynb (no outputs). Edit here, then run: python tools/make_notebook.py"""

from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

cells = [
    md("""# Federated Patch SVDD with an OpenFL director

Several sites hold MVTec-layout images they cannot pool. Each runs an **envoy** with its shard; the **director**
coordinates them. This notebook builds **Patch SVDD** (Yi & Yoon, ACCV 2020), trains it federatedly (FedAvg of all
weights), follows detection and segmentation AUROC per envoy, and shows anomaly maps. Every computation lives in the
`patchsvdd` package; the cells only configure, start and show.

Start the director and envoys first (`director_folder/start_director.sh`, `envoy_folder/start_envoy.sh NAME CONFIG`),
or run `make demo`, which does everything and executes this notebook."""),
    code("""# Parameters (papermill overrides this cell; see README for each setting)
director_host = "localhost"
director_port = 50050
expected_envoys = 2          # wait until this many envoys are online
category = "washer"          # for the records; each envoy's config names its own data
rounds = 5
repeat = 100                 # each training image used this many times per round (paper: 100)
max_steps = None             # cut each round's local epoch to this many steps (None: full epoch)
batch_size = 64              # pairs per loss (paper: 64)
lr = 1e-3                    # peak learning rate (CPU recipe 1e-3 with warm-up and cosine decay; paper: 1e-4 constant)
warmup_steps = 100           # linear warm-up steps (paper: 0)
schedule = "cosine"          # cosine decay to lr/10 over all rounds, or "constant" (paper)
precision = "auto"           # bf16 autocast where the envoy's GPU/CPU has it, else fp32; or "fp32"
init = "kaiming"             # fresh model: "kaiming" (spread embeddings, learns fast) or "pytorch" (as the paper's code)
lambda_svdd = 1e-3
holdout_fraction = 0.1       # good training images each envoy keeps out of training to choose the best model
emb_dim = 64                 # D
device_policy = "CUDA_PREFERRED"   # envoys use their first cuda_devices entry, else the CPU; or "CPU_ONLY"
round_search = "fast"        # nearest-neighbour search of the per-round validation: fast | exact
final_search = "exact"       # search of the final evaluation
final_model = "best"         # model of the final evaluation: best (lowest held-out position loss) | last
seed = 0
idle_timeout = 900           # seconds without any metric before giving up
output_dir = "../runs/notebook"
local_data_root = None       # a data root with <category>/ this notebook may read, for the gallery; None to skip
initial_checkpoint = None    # start from this checkpoint (an earlier best.pt, an imported released encoder)
export_bundles = True        # at the end every envoy writes its own inspection bundle of the final model
bank_fraction = 1.0          # share of each site's training patches its bundle keeps (smaller: faster, lighter)
experiment_name = None       # default: patchsvdd-<category>-<time>
attach = False               # True: take up experiment_name again (same output_dir) after a kernel restart
tls = False                  # mutual TLS: set the three files below
cert_chain = None
api_cert = None
api_private_key = None"""),
    code("""import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from patchsvdd import federated as fed
from patchsvdd import report, viz
from patchsvdd.checkpoint import load_checkpoint, save_checkpoint
from patchsvdd.metrics import split_defects
from patchsvdd.model import PatchSVDD

settings = fed.ExperimentSettings(
    rounds=rounds, repeat=repeat, max_steps=max_steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
    schedule=schedule, precision=precision, lambda_svdd=lambda_svdd, holdout_fraction=holdout_fraction,
    emb_dim=emb_dim, search=round_search, final_search=final_search, seed=seed, device_policy=device_policy,
    idle_timeout=idle_timeout,
)
out = Path(output_dir).resolve()
out.mkdir(parents=True, exist_ok=True)
experiment_name = experiment_name or f"patchsvdd-{category}-{time.strftime('%Y%m%d-%H%M%S')}"
print(f"results go to {out}")"""),
    md("## Connect to the director and see the envoys' shards"),
    code("""federation = fed.connect(director_host, director_port, tls=tls, cert_chain=cert_chain,
                         api_cert=api_cert, api_private_key=api_private_key)
display(Markdown(report.markdown_table(fed.wait_for_envoys(federation, expected_envoys))))"""),
    md("## The model: K=64 hierarchical encoder embedding the K=32 encoder, two position classifiers"),
    code("""torch.manual_seed(seed)
if initial_checkpoint:
    model, start_meta = load_checkpoint(initial_checkpoint)
    print(f"starting from {initial_checkpoint} (round {start_meta.get('round')}, {start_meta.get('experiment')})")
else:
    model = PatchSVDD(emb_dim=emb_dim, init=init)
print(fed.describe_model(model))"""),
    md("""## Train federatedly

Each round every envoy runs `train_epoch` on its own shard (less a few held-out good images), the director averages
all weights (weighted by shard size), and each envoy scores the averaged model on its own data: the position loss on
its held-out good images (`heldout_pos`, lower is better) and the AUROC of its test images against its own training
patches. **Round 0 scores the initial, untrained model**; a last, validation-only round scores the final average.
Whenever the averaged `heldout_pos` improves, that model is saved to `best.pt` (atomically, so a crash never leaves a
broken file): the model is chosen without any anomalous image, and the test AUROCs are only reported.
If this kernel dies, the experiment goes on: run the notebook again with `attach=True` and the same
`experiment_name` and `output_dir` to follow it to the end. If the director dies, restart it (the envoys
register again by themselves) and start a new experiment with `initial_checkpoint` set to `best.pt`."""),
    code("""def show(metric):
    if metric["metric_origin"] == "aggregator" and metric["task_name"] != "train":
        print(f"round {metric['round']}: {metric['metric_name']} {metric['metric_value']:.4f}")

if attach:  # the experiment kept running on the director while this kernel was gone
    experiment = fed.attach(federation, experiment_name, model, out / "experiment")
else:
    experiment = fed.start_experiment(federation, model, settings, experiment_name, out / "experiment")
saver = fed.SaveWhenImproved(experiment, out / "best.pt", category=category, experiment=experiment_name,
                             settings=fed.settings_dict(settings))
metrics = fed.follow_metrics(experiment, idle_timeout=idle_timeout, on_metric=show, checkpointer=saver)
report.write_json(out / "round_metrics.json", metrics.to_jsonable())
print(f"best held-out position loss {saver.best_score:.4f} in round {saver.best_round}")"""),
    md("## Untrained (round 0) against trained (final round)"),
    code("""learning = report.untrained_vs_trained(metrics.records)
report.write_json(out / "learning.json", learning)
display(Markdown(report.markdown_table(learning)))"""),
    md("## Best and last aggregated models"),
    code("""last_model = fed.fetch_last_model(experiment)
save_checkpoint(last_model, out / "last.pt", which="last", category=category, experiment=experiment_name,
                settings=fed.settings_dict(settings))
if final_model == "best" and saver.saved_round is not None:
    final, final_meta = load_checkpoint(out / "best.pt")
    print(f"final evaluation of best.pt: round {final_meta['round']}, held-out position loss {final_meta['score']:.4f}")
else:
    final = last_model
    print("final evaluation of last.pt")"""),
    md("## Losses and metrics per round"),
    code("""fig = viz.plot_rounds({
    "training position loss K=64": metrics.series("train", "pos_loss_64"),
    "training position loss K=32": metrics.series("train", "pos_loss_32"),
    "held-out position loss (chooses best)": metrics.series("aggregated_model_validate", "heldout_pos"),
    "detection AUROC (sum)": metrics.series("aggregated_model_validate", "det_sum"),
    "segmentation AUROC (sum)": metrics.series("aggregated_model_validate", "seg_sum"),
})
fig.savefig(out / "rounds.png", dpi=80, bbox_inches="tight")"""),
    md("""## Final evaluation on every envoy: eight AUROCs, AUPRO, scores per defect type

A one-round, validation-only experiment: each envoy scores the final model on its own data
(`final_search` nearest-neighbour search); no image leaves a site, only numbers (the defect types are folder names)."""),
    code("""evaluation = fed.start_evaluation(federation, final, settings, experiment_name + "-final", out / "evaluation")
final_metrics, per_defect = {}, {}
for node, values in fed.follow_metrics(evaluation, idle_timeout=idle_timeout).final().items():
    final_metrics[node], per_defect[node] = split_defects(values)
per_defect.pop("aggregator", None)  # a weighted mean of the envoys' statistics: not a table to read
report.write_json(out / "metrics.json", {"experiment": experiment_name, "model": final_model, "search": final_search,
                                         "per_node": final_metrics, "per_defect": per_defect})
display(Markdown(report.markdown_table(report.metrics_rows(final_metrics, fed.FINAL_METRICS))))
for node, table in sorted(per_defect.items()):
    display(Markdown(f"**{node}**: image scores ({fed.DEFECT_FUSION}) per defect type; AUROC of each type against good\\n\\n"
                     + report.markdown_table([{"type": name, **row} for name, row in table.items()],
                                             ["type", "n", "mean", "std", "min", "max", "auroc"])))"""),
    md("""## Anomaly maps

Only where this notebook may read some data itself (`local_data_root`): the final model scores it here, exactly as
an envoy would, with one colour scale for the whole category so that good images stay cool."""),
    code("""if local_data_root:
    from patchsvdd.data import index_category, load_category
    from patchsvdd.evaluate import evaluate_category

    data = load_category(index_category(local_data_root, category))
    local = evaluate_category(final, data, mode=final_search)
    report.write_json(out / "local_metrics.json", local.metrics)
    display(Markdown(report.markdown_table([{"node": "notebook", **local.metrics}], ["node", *fed.FINAL_METRICS])))
    maps = local.scores.maps["sum"].numpy()
    viz.save_gallery(out / "maps", data.test_images, data.test_masks, maps, data.test_names)
    viz.gallery_figure(data.test_images, data.test_masks, maps, data.test_names).savefig(out / "gallery.png", dpi=80)
    plt.show()
else:
    print("local_data_root not set: no gallery (the envoys' images stay at their sites)")"""),
    md("""## Site bundles: from the federated model to a decision on a new image

Each envoy writes an inspection bundle of the final model at its own site (its `bundle_folder`): its training mean
and patch embeddings, thresholds calibrated on its own labelled images. Only the thresholds and sizes come back here.
At a site: `patchsvdd predict BUNDLE IMAGES... --out DIR` or `patchsvdd serve BUNDLE`."""),
    code("""if export_bundles:
    bundle_name = experiment_name + "-bundle"
    export = fed.start_export(federation, final, settings, bundle_name, out / "bundles", bank_fraction=bank_fraction)
    sites = fed.follow_metrics(export, idle_timeout=idle_timeout).final()
    folders = fed.shard_bundle_folders(federation)
    bundles = [{"envoy": node, "bundle at the site": f"{folders.get(node)}/{bundle_name}", **values}
               for node, values in sorted(sites.items()) if node != "aggregator"]
    report.write_json(out / "bundles.json", bundles)
    display(Markdown(report.markdown_table(bundles)))"""),
]

nb = nbf.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
})
nb.cells[1].metadata["tags"] = ["parameters"]
path = Path(__file__).resolve().parents[1] / "workspace" / "PatchSVDD_with_Director.ipynb"
nbf.write(nb, path)
print("wrote", path)
