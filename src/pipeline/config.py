"""Resolve a run's configuration from the YAML files in ``configs/``.

A run's config is, merged in this order: ``data.yaml``, ``profile/<cpu|gpu>.yaml``,
``model/<family>.yaml`` (its top level, then its ``<profile>:`` block), then
``--set key.path=value`` overrides from the command line. The result is saved with
every MLflow run as ``config.yaml``.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import os
from pathlib import Path
from typing import Any

import yaml

PROFILES = ("cpu", "gpu")


from pipeline.errors import ConfigError  # noqa: E402


def config_dir() -> Path:
    """``configs/`` of the checkout, or ``PIPELINE_CONFIG_DIR``."""
    if "PIPELINE_CONFIG_DIR" in os.environ:
        return Path(os.environ["PIPELINE_CONFIG_DIR"])
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "configs" / "data.yaml").exists():
            return parent / "configs"
    return Path.cwd() / "configs"


def deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read(path: Path) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def available_models(directory: Path | None = None) -> list[str]:
    return sorted(p.stem for p in ((directory or config_dir()) / "model").glob("*.yaml"))


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"Override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:  # YAML 1.1 reads 5e-4 as text; on the command line it is a number
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    config = copy.deepcopy(config)
    for text in overrides:
        keys, value = parse_override(text)
        node = config
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {text!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return config


def resolve_config(family: str, profile: str, overrides: list[str] | None = None,
                   directory: Path | None = None) -> dict:
    """The full config of one training run."""
    directory = directory or config_dir()
    if profile not in PROFILES:
        raise ConfigError(f"Unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    model_file = directory / "model" / f"{family}.yaml"
    if not model_file.exists():
        raise ConfigError(
            f"Unknown model family {family!r}: choose one of {', '.join(available_models(directory))}"
        )
    model = _read(model_file)
    profile_blocks = {name: model.pop(name, {}) for name in PROFILES}
    config = deep_merge(_read(directory / "data.yaml"), _read(directory / "profile" / f"{profile}.yaml"))
    config = deep_merge(config, model)
    config = deep_merge(config, profile_blocks[profile])
    config["family"] = family
    config["profile"] = profile
    config = apply_overrides(config, overrides or [])
    validate(config)
    return config


def _parameters(function, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """name -> default (inspect.Parameter.empty when required) of a callable's keyword parameters."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if name not in skip and name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def schema() -> dict[str, dict[str, Any]]:
    """Every section's known keys with a default that gives its type (None: any type)."""
    import lightning as L

    from pipeline.data import ImageFolderDataModule
    from pipeline.module import ImageClassifier

    return {
        "data": _parameters(ImageFolderDataModule.__init__, ("data_dir",)),
        "optim": _parameters(ImageClassifier.__init__, ("arch", "model_args", "classes", "mean", "std", "image_size")),
        "trainer": {name: None for name in _parameters(L.Trainer.__init__)},
        "model": {"arch": "", "args": None, "tta": 0},
        "tracking": {"experiment": "", "registered_model": "", "alias": "", "system_metrics_interval_s": 10.0},
        "checkpoint": {"every_n_epochs": 1, "select": "last"},
        "calibration": {"temperature": True},
        "out_of_scope": {"score": "combined", "k": 10, "bank_size": 4000, "keep": 0.95},
        "evaluation": {"folders": None},
        "": {"seed": 0, "family": "", "profile": "", "data": None, "optim": None, "trainer": None, "model": None,
             "tracking": None, "checkpoint": None, "calibration": None, "out_of_scope": None, "evaluation": None},
    }


def _type_name(value: Any) -> str:
    return {bool: "true/false", int: "a whole number", float: "a number", str: "text", list: "a list",
            dict: "a section"}.get(type(value), type(value).__name__)


def _fits(value: Any, default: Any) -> bool:
    if default is None or default is inspect.Parameter.empty or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        # flip accepts true/false or "alternate"; other bools must stay bools
        return isinstance(value, bool) or (isinstance(default, bool) and isinstance(value, str))
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def validate(config: dict) -> None:
    """Refuse unknown keys (naming the closest known ones) and values of the wrong type."""
    select = (config.get("checkpoint") or {}).get("select", "last")
    if select not in ("last", "best"):
        raise ConfigError(f"Config key checkpoint.select must be last or best, got {select!r}.")
    kind = (config.get("out_of_scope") or {}).get("score", "combined")
    if kind not in ("combined", "energy", "knn"):
        raise ConfigError(f"Config key out_of_scope.score must be combined, energy or knn, got {kind!r}.")
    keep = (config.get("out_of_scope") or {}).get("keep", 0.95)
    if not isinstance(keep, (int, float)) or not 0.5 <= keep < 1.0:
        raise ConfigError(f"Config key out_of_scope.keep must be a number in [0.5, 1), got {keep!r}.")
    folders = (config.get("evaluation") or {}).get("folders") or {}
    if not isinstance(folders, dict) or not all(isinstance(v, str) for v in folders.values()):
        raise ConfigError(f"Config key evaluation.folders must map names to folder paths, got {folders!r}.")
    known = schema()
    for section, keys in known.items():
        node = config if section == "" else config.get(section)
        if node is None:
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"Config key {section!r} must be a section of keys, got {node!r}.")
        for key, value in node.items():
            name = f"{section}.{key}" if section else key
            if key not in keys:
                choices = [f"{section}.{k}" if section else k for k in keys]
                close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
                hint = f"did you mean {' or '.join(close)}?" if close else f"known keys: {', '.join(sorted(choices))}."
                raise ConfigError(f"Unknown config key {name}: {hint}")
            if not _fits(value, keys[key]):
                raise ConfigError(f"Config key {name} must be {_type_name(keys[key])}, got {value!r}.")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``, for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
