"""Resolve a run's configuration from the YAML files in ``configs/``.

A run's config is, merged in this order: ``data.yaml``, ``profile/<cpu|gpu>.yaml``,
``model/<family>.yaml`` (its top level, then its ``<profile>:`` block), then
``--set key.path=value`` overrides from the command line. The result is saved with
every MLflow run as ``config.yaml``.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass, fields
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
    """The full config of one training run.

    The profile says what the machine is (accelerator, precision, checkpoint cadence, eval batch); the
    model YAML says what the recipe is on each kind of machine (its top level, and its ``gpu:`` block).
    A key set in both would be overridden silently, so it is refused.
    """
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
    profile_file = directory / "profile" / f"{profile}.yaml"
    machine = _read(profile_file)
    both = sorted(set(flatten(machine)) & (set(flatten(model)) | set(flatten(profile_blocks[profile]))))
    if both:
        raise ConfigError(f"{both[0]} is set in {profile_file} and in {model_file}: a profile says what the machine "
                          f"is, a model YAML (and its {profile}: block) what the recipe is; set it in one of them.")
    config = deep_merge(_read(directory / "data.yaml"), machine)
    config = deep_merge(config, model)
    config = deep_merge(config, profile_blocks[profile])
    config["family"] = family
    config["profile"] = profile
    config = apply_overrides(config, overrides or [])
    validate(config)
    return config


def tracking_defaults(directory: Path | None = None) -> dict[str, str]:
    """``tracking:`` of ``data.yaml``: the experiment, registered model and alias every command defaults to."""
    tracking = _read((directory or config_dir()) / "data.yaml").get("tracking") or {}
    return {"experiment": tracking.get("experiment", "cifar4"),
            "registered_model": tracking.get("registered_model", "cifar4-classifier"),
            "alias": tracking.get("alias", "champion")}


@dataclass
class OptimSettings:
    """``optim:`` of a run's config: the optimiser recipe and its numbers (the LightningModule reads these)."""
    recipe: str = "sgd"              # sgd (plain SGD-Nesterov) or airbench (pipeline.recipe)
    lr: float = 0.1                  # sgd: the rate; airbench: per 1024 examples
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "onecycle"       # sgd: onecycle or cosine
    warmup_fraction: float = 0.2
    bias_lr_scale: float = 64.0      # airbench: BatchNorm biases learn this much faster
    lookahead: bool = False
    whiten_bias_epochs: int = 3      # airbench: the whitening layer's bias learns for this many epochs
    lr_start: float = 0.2            # airbench: warm-up starts at this share of lr
    lr_end: float = 0.07             # airbench: decay ends at this share of lr
    muon: bool = False               # airbench: conv filters take Muon's orthogonalised step (recipe.MuonSGD)
    muon_lr: float = 0.24            # ... at this rate (per step, on filters renormalised to norm sqrt(out))
    muon_momentum: float = 0.6
    outlier_loss: str = "uniform"    # with data.outliers: uniform (cross-entropy to the uniform answer) or energy
    outlier_weight: float = 0.5      # ... the outlier loss's weight beside the classification loss


# The keys of each section with a default that gives the type (None: any type). Kept here, not read
# from the classes' signatures, so that checking a config imports neither torch nor Lightning;
# tests/test_config.py checks that they match ImageFolderDataModule, OptimSettings and L.Trainer.
DATA_KEYS = {"image_size": 32, "val_fraction": 0.1, "test_fraction": 0.1, "batch_size": 128, "eval_batch_size": 512,
             "seed": 42, "test_seed": None, "crop_padding": 4, "pad_mode": "constant", "flip": True, "cutout": 0, "zoom": 0.0,
             "color_jitter": 0.0, "on_bad_image": "error", "cache_dir": None, "sources": None, "outliers": None,
             "outlier_share": 0.25, "outlier_holdout": 0.2}
TRAINER_KEYS = (
    "accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks", "fast_dev_run",
    "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches", "limit_val_batches",
    "limit_test_batches", "limit_predict_batches", "overfit_batches", "val_check_interval",
    "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps", "enable_checkpointing",
    "enable_progress_bar", "enable_model_summary", "accumulate_grad_batches", "gradient_clip_val",
    "gradient_clip_algorithm", "deterministic", "benchmark", "inference_mode", "use_distributed_sampler",
    "profiler", "detect_anomaly", "barebones", "plugins", "sync_batchnorm", "reload_dataloaders_every_n_epochs",
    "default_root_dir", "enable_autolog_hparams", "model_registry")


def schema() -> dict[str, dict[str, Any]]:
    """Every section's known keys with a default that gives its type (None: any type)."""
    return {
        "data": dict(DATA_KEYS),
        "optim": {f.name: f.default for f in fields(OptimSettings)},
        "trainer": {name: None for name in TRAINER_KEYS},
        "model": {"arch": "", "args": None, "tta": 0, "module": ""},
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
    if default is None or value is None:
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
    optim = config.get("optim") or {}
    if optim.get("recipe", "sgd") not in ("sgd", "airbench"):
        raise ConfigError(f"Config key optim.recipe must be sgd or airbench, got {optim['recipe']!r}.")
    if optim.get("muon") and optim.get("recipe", "sgd") != "airbench":
        raise ConfigError("Config key optim.muon needs optim.recipe airbench (it replaces that recipe's filter "
                          "updates); with another recipe, add --set optim.muon=false.")
    if optim.get("schedule", "onecycle") not in ("onecycle", "cosine"):
        raise ConfigError(f"Config key optim.schedule must be onecycle or cosine, got {optim['schedule']!r}.")
    if optim.get("outlier_loss", "uniform") not in ("uniform", "energy"):
        raise ConfigError(f"Config key optim.outlier_loss must be uniform or energy, got {optim['outlier_loss']!r}.")
    for key in ("sources", "outliers"):
        value = (config.get("data") or {}).get(key)
        if value is not None and not isinstance(value, list):
            raise ConfigError(f"Config key data.{key} must be a list of folders, got {value!r}.")
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
