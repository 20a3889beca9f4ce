"""Resolve a run's configuration from the YAML files in ``configs/``.

A run's config is, merged in this order: ``data.yaml``, ``profile/<cpu|gpu>.yaml``,
``model/<family>.yaml`` (its top level, then its ``<profile>:`` block), then
``--set key.path=value`` overrides from the command line. The result is saved with
every MLflow run as ``config.yaml``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

PROFILES = ("cpu", "gpu")


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
        raise ValueError(f"Override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    config = copy.deepcopy(config)
    for text in overrides:
        keys, value = parse_override(text)
        node = config
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"Override {text!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return config


def resolve_config(family: str, profile: str, overrides: list[str] | None = None,
                   directory: Path | None = None) -> dict:
    """The full config of one training run."""
    directory = directory or config_dir()
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    model_file = directory / "model" / f"{family}.yaml"
    if not model_file.exists():
        raise ValueError(
            f"Unknown model family {family!r}: choose one of {', '.join(available_models(directory))}"
        )
    model = _read(model_file)
    profile_blocks = {name: model.pop(name, {}) for name in PROFILES}
    config = deep_merge(_read(directory / "data.yaml"), _read(directory / "profile" / f"{profile}.yaml"))
    config = deep_merge(config, model)
    config = deep_merge(config, profile_blocks[profile])
    config["family"] = family
    config["profile"] = profile
    return apply_overrides(config, overrides or [])


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
