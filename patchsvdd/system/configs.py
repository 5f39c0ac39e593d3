"""Checks of the director and envoy YAML configs, run by the start scripts before OpenFL starts.

``python -m patchsvdd.system.configs director|envoy CONFIG`` prints one clear line and
exits 2 on a missing or malformed file, a missing setting, or (envoy) data the
reader rejects; it prints nothing and exits 0 when all is well. No torch, no OpenFL.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from patchsvdd.data.mvtec import MVTecDataError, index_category, load_category, parse_rank_worldsize
from patchsvdd.errors import InputError, exit_code

ENVOY_CONFIG_DIR_VAR = "PATCHSVDD_ENVOY_CONFIG_DIR"


class ConfigError(InputError):
    """A config file that cannot be used; the message names the file and the setting."""


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse ``path`` into a mapping, or raise ConfigError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(content).__name__}")
    return content


def _get(config: dict[str, Any], dotted: str, path: Path) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{path}: setting '{dotted}' is missing")
        node = node[part]
    return node


def check_director_config(path: str | os.PathLike) -> dict[str, Any]:
    """Validate a director config: port in range, shapes given as lists."""
    path = Path(path)
    config = read_yaml(path)
    port = _get(config, "settings.listen_port", path)
    if not isinstance(port, int) or not 1024 <= port <= 65535:
        raise ConfigError(f"{path}: settings.listen_port {port!r} must be a whole number in 1024..65535")
    if config.get("review_experiments", True) is not True:
        raise ConfigError(
            f"{path}: review_experiments {config['review_experiments']!r}: the director always reviews experiments "
            "and builds what it runs from its own code (docs/security.md); remove the setting"
        )
    for key in ("settings.sample_shape", "settings.target_shape"):
        shape = _get(config, key, path)
        if not isinstance(shape, list) or not all(str(s).isdigit() for s in shape):
            raise ConfigError(f"{path}: {key} {shape!r} must be a list of sizes, e.g. ['256', '256', '3']")
    return config


def resolve_data_folder(data_folder: str | os.PathLike, config_dir: str | os.PathLike | None = None) -> Path:
    """The absolute folder: a relative ``data_folder`` is taken relative to the envoy config's folder
    (``config_dir``, else ``$PATCHSVDD_ENVOY_CONFIG_DIR``, which the start script sets), else, under a plain
    ``fx envoy start``, to the current folder; absolute, so that every message names the folder really read."""
    folder = Path(data_folder).expanduser()
    base = config_dir if config_dir is not None else os.environ.get(ENVOY_CONFIG_DIR_VAR)
    if not folder.is_absolute() and base:
        folder = Path(base) / folder
    return folder.absolute()


def check_envoy_config(path: str | os.PathLike, check_data: bool = True, engine: str = "openfl") -> dict[str, Any]:
    """Validate an envoy config and, with ``check_data``, index and decode its shard (as the envoy will);
    ``engine``: the engine the site is started on ('openfl': the envoy, 'flower': the SuperNode's site)."""
    path = Path(path)
    config = read_yaml(path)
    _get(config, "shard_descriptor.template", path)
    params = _get(config, "shard_descriptor.params", path)
    for key in ("data_folder", "category"):
        _get(config, f"shard_descriptor.params.{key}", path)
    cuda = (config.get("params") or {}).get("cuda_devices", [])
    if not isinstance(cuda, list) or not all(isinstance(d, int) and d >= 0 for d in cuda):
        raise ConfigError(f"{path}: params.cuda_devices {cuda!r} must be a list of GPU ids, e.g. [0], or [] for CPU")
    if config.get("trust_client_code", False) is not False:
        raise ConfigError(
            f"{path}: trust_client_code {config['trust_client_code']!r}: a site never runs code a client sends; it "
            "builds everything from its own code (docs/security.md); remove the setting"
        )
    install = (config.get("params") or {}).get("install_requirements", False)
    if not isinstance(install, bool):
        raise ConfigError(f"{path}: params.install_requirements {install!r} must be true or false")
    secure = config.get("secure_aggregation", "optional")
    if secure not in ("optional", "required"):
        raise ConfigError(f"{path}: secure_aggregation {secure!r} must be optional or required")
    if secure == "required" and engine != "flower":
        raise ConfigError(
            f"{path}: secure_aggregation is required, and OpenFL 1.7.1 has no secure aggregation: start "
            "this site on Flower (envoy_folder/start_supernode.sh), or set it to optional"
        )
    folder = resolve_data_folder(params["data_folder"], path.parent)
    try:
        rank, world = parse_rank_worldsize(str(params.get("rank_worldsize", "1,1")))
        if check_data:
            load_category(index_category(folder, str(params["category"])).shard(rank, world))
    except MVTecDataError as exc:
        hint = ""
        if not (folder / str(params["category"])).is_dir():
            hint = (
                f". To make the built-in demo data there, run 'make install' in the project "
                "(it writes data/demo/washer) "
                f"or 'patchsvdd synth --out {folder} --category {params['category']}'"
            )
        raise ConfigError(f"{path}: shard_descriptor.params: {exc}{hint}") from exc
    return config


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    engines = ("openfl", "flower")
    engine = args[2] if len(args) == 3 else "openfl"
    if len(args) not in (2, 3) or args[0] not in ("director", "envoy") or engine not in engines:
        print("usage: python -m patchsvdd.system.configs director|envoy CONFIG [openfl|flower]", file=sys.stderr)
        return 2
    if args[0] == "director":
        return exit_code(lambda: check_director_config(args[1]), ConfigError, "director config error: ")
    return exit_code(lambda: check_envoy_config(args[1], engine=engine), ConfigError, "envoy config error: ")


if __name__ == "__main__":
    sys.exit(main())
