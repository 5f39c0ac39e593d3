"""Formatting helpers: untrained (round 0) against trained (last round) from the streamed metrics."""

from __future__ import annotations

from patchsvdd.evaluation.report import markdown_table, untrained_vs_trained


def _record(round_: int, origin: str, name: str, value: float, task: str = "aggregated_model_validate") -> dict:
    return {"round": round_, "metric_origin": origin, "task_name": task, "metric_name": name, "metric_value": value}


def test_untrained_vs_trained_takes_the_first_and_last_round_per_node() -> None:
    records = [
        _record(1, "envoy_1", "det_sum", 0.8),
        _record(0, "envoy_1", "det_sum", 0.6),
        _record(2, "envoy_1", "det_sum", 0.9),
        _record(0, "aggregator", "det_sum", 0.65),
        _record(2, "aggregator", "det_sum", 0.85),
        _record(0, "aggregator", "heldout_pos", 4.2),
        _record(2, "aggregator", "heldout_pos", 3.1),
        _record(1, "envoy_1", "train_loss", 4.0, task="train"),
        _record(2, "envoy_1", "det_64", 0.1),
    ]
    rows = untrained_vs_trained(records)
    assert [r["node"] for r in rows] == ["envoy_1", "aggregator"]
    assert rows[0]["det_sum untrained"] == 0.6 and rows[0]["det_sum trained"] == 0.9
    assert rows[0]["heldout_pos untrained"] is None  # never reported by that node
    assert rows[1]["heldout_pos untrained"] == 4.2 and rows[1]["heldout_pos trained"] == 3.1
    assert "| aggregator | 4.2000 | 3.1000 | 0.6500 | 0.8500 | n/a | n/a |" in markdown_table(rows)


def test_framework_log_goes_to_a_file(tmp_path) -> None:
    import logging
    import warnings

    from patchsvdd.evaluation.report import FRAMEWORK_LOGGERS, log_framework_to

    path = log_framework_to(tmp_path / "logs" / "framework.log")
    try:
        logging.getLogger("openfl.something").info("Getting experiment Status...")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            logging.captureWarnings(True)
            warnings.warn("a framework warning", UserWarning, stacklevel=1)
        for handler in logging.getLogger("openfl").handlers:
            handler.flush()
        text = path.read_text()
        assert "Getting experiment Status" in text and "a framework warning" in text
    finally:
        logging.captureWarnings(False)
        for name in FRAMEWORK_LOGGERS:
            logging.getLogger(name).handlers = []
            logging.getLogger(name).propagate = True


def test_demo_summary_gives_each_envoys_detection_noise(tmp_path) -> None:
    import json

    from patchsvdd.cli.demo_summary import summarise
    from patchsvdd.evaluation.metrics import auroc_standard_error
    from patchsvdd.evaluation.report import test_set_sizes

    per_defect = {
        "envoy_1": {
            "good": {"n": 20.0, "mean": 1.0},
            "crack": {"n": 25.0, "auroc": 0.7},
            "stain": {"n": 15.0, "auroc": 0.9},
        }
    }
    assert test_set_sizes(per_defect) == {"envoy_1": (20, 40)}
    notebook = tmp_path / "notebook"
    notebook.mkdir()
    records = [
        _record(0, "envoy_1", "det_sum", 0.6),
        _record(5, "envoy_1", "det_sum", 0.9),
        _record(0, "aggregator", "det_sum", 0.6),
        _record(5, "aggregator", "det_sum", 0.9),
    ]
    (notebook / "round_metrics.json").write_text(json.dumps(records))
    (notebook / "metrics.json").write_text(
        json.dumps(
            {"model": "best", "search": "exact", "per_defect": per_defect, "per_node": {"envoy_1": {"det_sum": 0.9}}}
        )
    )
    text = summarise(tmp_path, 1.0)
    before, after = auroc_standard_error(0.6, 20, 40), auroc_standard_error(0.9, 20, 40)
    assert before > after > 0.03  # a small test set: a few points of AUROC are noise
    assert f"envoy_1 (20 good, 40 defective) {before:.3f} -> {after:.3f}" in text
    assert "aggregator (" not in text  # no test-set size of its own


def test_demo_summary_gives_the_time_of_each_phase(tmp_path) -> None:
    import json

    from patchsvdd.cli.demo_summary import NOTEBOOK, phase_seconds, summarise

    def cell(source: str, seconds: float | None) -> dict:
        timing = {} if seconds is None else {"papermill": {"duration": seconds}}
        return {"cell_type": "code", "source": [source], "metadata": timing}

    executed = {
        "cells": [
            cell("settings = 1", 2.0),
            cell("trained = experiment.train(a)", 300.5),
            cell("evaluation = experiment.evaluate(b)", 40.0),
            cell("x = experiment.export(c)", 30.0),
            cell("plots.save_gallery(d)", 12.0),
            cell("print()", 1.5),
            cell("never ran", None),
            {"cell_type": "markdown", "source": ["experiment.train("], "metadata": {}},
        ]
    }
    (tmp_path / NOTEBOOK.name).write_text(json.dumps(executed))
    assert phase_seconds(tmp_path / NOTEBOOK.name) == {
        "other": 3.5,
        "rounds": 300.5,
        "evaluation": 40.0,
        "export": 30.0,
        "gallery": 12.0,
    }
    notebook = tmp_path / "notebook"
    notebook.mkdir()
    (notebook / "round_metrics.json").write_text("[]")
    (notebook / "metrics.json").write_text(json.dumps({"model": "best", "search": "fast", "per_node": {}}))
    text = summarise(tmp_path, 420.0, started=33.0)
    assert (
        "time per phase: data and start 33 s, other 4 s, rounds 300 s, evaluation 40 s, export 30 s, gallery 12 s"
    ) in text


def test_tables_show_counts_as_whole_numbers_and_answers_as_words() -> None:
    from patchsvdd.evaluation.report import markdown_table

    table = markdown_table(
        [{"envoy": "site_a", "n": 20.0, "bank_rows_32": 97470.0, "calibrated": 1.0, "auroc": 1.0, "online": True}]
    )
    assert table.splitlines()[-1] == "| site_a | 20 | 97,470 | yes | 1.0000 | yes |"
    assert markdown_table([{"n": 2.5, "calibrated": 0.0, "auroc": None}]).splitlines()[-1] == "| 2.5000 | no | n/a |"
