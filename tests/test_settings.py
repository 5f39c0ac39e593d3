"""One source of settings: the notebook's parameter cell, the demo and the CLI agree with ``settings``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from patchsvdd.settings import DEMO_SETTINGS, LEARN_BUDGET, ExperimentSettings, SettingsError, TrainSettings

NOTEBOOK = Path(__file__).resolve().parents[1] / "workspace" / "PatchSVDD_with_Director.ipynb"


def _cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text())["cells"]


def test_every_setting_is_a_notebook_parameter_with_the_same_default(notebook_parameters: dict) -> None:
    parameters = notebook_parameters
    defaults = ExperimentSettings()
    for field in fields(ExperimentSettings):
        assert field.name in parameters, f"the notebook has no parameter {field.name}"
        assert parameters[field.name] == getattr(defaults, field.name), field.name


def test_the_notebook_passes_every_parameter_to_the_settings() -> None:
    """The cell that builds ExperimentSettings passes each field as name=name (none left at its default)."""
    source = next("".join(c["source"]) for c in _cells() if "ExperimentSettings(" in "".join(c["source"]))
    call = next(
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "ExperimentSettings"
    )
    passed = {kw.arg: kw.value.id for kw in call.keywords if isinstance(kw.value, ast.Name)}
    assert passed == {f.name: f.name for f in fields(ExperimentSettings)}


def test_notebook_is_kept_without_outputs() -> None:
    for cell in _cells():
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_training_defaults_come_from_the_recipe() -> None:
    settings = ExperimentSettings()
    quick = {"batch_size": 32, "warmup_steps": 40}  # a first run of minutes: smaller steps, a shorter warm-up
    assert settings.train_settings() == replace(TrainSettings(), **quick)
    assert (settings.rounds, settings.max_steps) == (2, 40)
    assert DEMO_SETTINGS == replace(settings, final_search="fast", idle_timeout=600.0)
    learn = replace(settings, **LEARN_BUDGET)
    assert learn.train_settings().steps_per_epoch(27, learn.max_steps) * learn.rounds == 1200  # steps per envoy


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"rounds": 0}, "rounds=0"),
        ({"max_steps": 0}, "max_steps=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"round_search": "slow"}, "round_search='slow'"),
        ({"final_model": "first"}, "final_model='first'"),
        ({"aggregator_port": 70000}, "aggregator_port=70000"),
        ({"holdout_fraction": 1.0}, "holdout_fraction=1.0"),
        ({"model_options": {"init": "xavier"}}, "init='xavier'"),
        ({"model_options": {"emb_dim": 0}}, "emb_dim=0"),
        ({"model_options": {"emb_dim": 8.0}}, "model_options.emb_dim of patchsvdd is 8.0, not of type int"),
        ({"model_options": {"lambda_svdd": float("nan")}}, "lambda_svdd of patchsvdd is nan"),
        ({"model": "autoencoder", "model_options": {"emb_dim": 8}}, "autoencoder has no option 'emb_dim'"),
        ({"model_options": [("emb_dim", 8)]}, "model_options=.*a mapping"),
        ({"idle_timeout": 0}, "idle_timeout=0"),
    ],
)
def test_settings_out_of_range_name_themselves(bad: dict, named: str) -> None:
    with pytest.raises(SettingsError, match=named.replace("[", r"\[").replace("(", r"\(")):
        ExperimentSettings(**bad)


def test_settings_and_every_models_options_need_no_torch() -> None:
    """The envoy side, the demo and the CLI's help read the settings and each model's options without torch."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
        "from patchsvdd.models.registry import model_names\n"
        "from patchsvdd.settings import ExperimentSettings\n"
        "for name in model_names():\n"
        "    print(name, ExperimentSettings(model=name).options())\n"
        "print(ExperimentSettings(model_options={'emb_dim': 8}).options().emb_dim)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "PatchSVDDOptions(emb_dim=64" in out.stdout and "AutoencoderOptions(latent_dim=128" in out.stdout
    assert out.stdout.splitlines()[-1] == "8"
