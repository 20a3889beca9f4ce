"""A run's settings: typed sections with their defaults, and the YAML files of ``configs/`` over them.

Every key is a field of one dataclass below (:class:`Config` and its sections), with its default,
type, allowed values and meaning, written once. A run's config is those defaults with, merged in
this order: ``data.yaml``, ``profile/<cpu|gpu>.yaml``, ``model/<family>.yaml`` (its top level, then its
``<profile>:`` block), then ``--set key.path=value`` overrides from the command line. The YAML files
hold only what differs from the defaults; ``pipeline config FAMILY`` prints every key with where its
value came from. ``Config.to_dict()`` is saved with every MLflow run as ``config.yaml``.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

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
                   directory: Path | None = None) -> Config:
    """The full, checked config of one training run."""
    return resolve_with_origins(family, profile, overrides, directory)[0]


def resolve_with_origins(family: str, profile: str, overrides: list[str] | None = None,
                         directory: Path | None = None) -> tuple[Config, dict[str, str]]:
    """The config of one run, and where each key set in a file or on the command line came from.

    The profile says what the machine is (accelerator, precision, checkpoint cadence, eval batch); the
    model YAML says what the recipe is on each kind of machine (its top level, and its ``gpu:`` block).
    A key set in both would be overridden silently, so it is refused. Keys set nowhere take the
    typed defaults below.
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
    layers = [(f"configs/{name}", _read(directory / name) if i == 0 else layer) for i, (name, layer) in enumerate(
        [("data.yaml", None), (f"profile/{profile}.yaml", machine), (f"model/{family}.yaml", model),
         (f"model/{family}.yaml {profile}:", profile_blocks[profile])])]
    config: dict = {}
    origins: dict[str, str] = {}
    for where, layer in layers:
        config = deep_merge(config, layer)
        origins.update(dict.fromkeys(flatten(layer), where))
    config.update(family=family, profile=profile)
    origins.update(family="the command (--models)", profile="the command (--profile)")
    for text in overrides or []:
        config = apply_overrides(config, [text])
        origins[text.split("=", 1)[0].strip()] = "--set"
    resolved = Config.from_dict(config)
    if resolved.trainer.max_epochs is None:
        raise ConfigError(f"{model_file} must set trainer.max_epochs: the epochs are part of a family's recipe.")
    scale = resolved.trainer.epoch_scale
    if scale != 1 and origins.get("trainer.max_epochs") != "--set":  # a recipe's epochs; not an explicit --epochs
        # every reader (the schedule, checkpoints, resume) sees the scaled number
        resolved.trainer.max_epochs = max(1, round(resolved.trainer.max_epochs * scale))
        origins["trainer.max_epochs"] = f"{origins.get('trainer.max_epochs', 'default')} x trainer.epoch_scale {scale:g}"
    return resolved, origins


def tracking_defaults(directory: Path | None = None) -> dict[str, str]:
    """The experiment, registered model and alias every command defaults to (``tracking:``, data.yaml over the defaults)."""
    tracking = TrackingSettings(**(_read((directory or config_dir()) / "data.yaml").get("tracking") or {}))
    return {"experiment": tracking.experiment, "registered_model": tracking.registered_model, "alias": tracking.alias}


# Typed settings: one dataclass per config section. Each key's default, type, allowed values and meaning
# are written here once; the YAML files hold only what differs, and every reader takes its section.
# Nothing here imports torch or Lightning, so checking a YAML stays fast.

def setting(default: Any, meaning: str, choices: tuple = (), within: str = "") -> Any:
    """A config key: its default, a one-line meaning, and optionally its choices or interval (``"[0, 1)"``)."""
    metadata = {"meaning": meaning, "choices": choices, "within": within}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataSettings:
    """``data:``: where images come from, how they are split, augmented and batched."""
    image_size: int = setting(32, "every image is centre-cropped and resized to this square", within="[8, 1024]")
    test_fraction: float = setting(0.1, "held out first (seeded) when a source has no test/: never trained on or "
                                        "used to choose", within="[0, 1)")
    val_fraction: float = setting(0.1, "of the rest: the validation split that picks checkpoints and the champion",
                                  within="(0, 1)")
    batch_size: int = setting(128, "global: each DDP rank takes batch_size / world_size", within="[1, 65536]")
    eval_batch_size: int = setting(512, "batch of validation, test and scoring passes", within="[1, 65536]")
    seed: int = setting(42, "the validation split's draw (the run's own seed is the top-level seed)")
    test_seed: int = setting(2027, "the test split's own draw (was seed + 1 until the recipe tries had read that one)")
    crop_padding: int = setting(4, "random crop with this padding, on the training device", within="[0, 64]")
    pad_mode: str = setting("constant", "padding of the random crop", choices=("constant", "reflect"))
    flip: bool | str = setting(True, "random mirror: true, false, or alternate (airbench: every other epoch)",
                               choices=(True, False, "alternate"))
    cutout: int = setting(0, "side of a square set to the mean colour per training image (0: off)", within="[0, 1024]")
    zoom: float = setting(0.0, "random-resized crops: smallest area kept (0: off; 0.5 keeps half to all)",
                          within="[0, 1)")
    color_jitter: float = setting(0.0, "brightness, contrast and saturation x (1 +/- this) per training image "
                                       "(0: off)", within="[0, 1)")
    on_bad_image: str = setting("error", "error: stop at a file that does not decode; skip: leave such files out "
                                         "(at most 1%)", choices=("error", "skip"))
    cache_dir: Optional[str] = setting(None, "where decoded sources are cached (default: .cache/ of the project)")
    sources: list = setting([], "labelled folders when no --data is given: [DIR, {path: DIR, weight: 2, exclude: "
                                "[file-name patterns]}]; each is split on its own")
    outliers: list = setting([], "unlabelled folders of out-of-scope images for outlier exposure (--outliers DIR)")
    outlier_share: float = setting(0.25, "outliers appended to each training batch, as a share of it (0: only "
                                         "scored, never trained on)", within="[0, 4]")
    outlier_holdout: float = setting(0.2, "share of the outlier classes held out, half as validation, half as "
                                          "test outliers", within="(0, 1)")
    outlier_holdout_images: int = setting(100, "at most this many images of each held-out outlier class are scored "
                                               "(seeded; 0: all), so a class of 2,000 images does not outweigh "
                                               "twenty of 100 in the outlier AUROC", within="[0, 1000000]")


@dataclass
class OptimSettings:
    """``optim:``: the optimiser recipe and its numbers (the LightningModule reads these)."""
    recipe: str = setting("sgd", "sgd (SGD-Nesterov) or airbench (pipeline.recipe)", choices=("sgd", "airbench"))
    lr: float = setting(0.1, "sgd: the peak rate; airbench: per 1024 examples", within="(0, 1000]")
    momentum: float = setting(0.9, "SGD's (Nesterov) momentum", within="[0, 1)")
    weight_decay: float = setting(5e-4, "sgd: L2 on every weight; airbench: per 1024 examples, decoupled",
                                  within="[0, 10]")
    label_smoothing: float = setting(0.0, "cross-entropy's label smoothing (0.2 left ResNet-9 13 points "
                                          "underconfident, test ECE 0.127; docs/trust.md)", within="[0, 1)")
    schedule: str = setting("onecycle", "sgd: the rate's schedule", choices=("onecycle", "cosine"))
    warmup_fraction: float = setting(0.2, "share of the steps that warm the rate up", within="[0, 1)")
    bias_lr_scale: float = setting(64.0, "airbench: BatchNorm biases learn this much faster", within="(0, 10000]")
    lookahead: bool = setting(False, "keep a slow average of the weights (airbench's lookahead); the run ends on it")
    whiten_bias_epochs: int = setting(3, "airbench: the whitening layer's bias learns for this many epochs",
                                      within="[0, 10000]")
    lr_start: float = setting(0.2, "airbench: warm-up starts at this share of lr", within="[0, 1]")
    lr_end: float = setting(0.07, "airbench: decay ends at this share of lr", within="[0, 1]")
    muon: bool = setting(False, "airbench: conv filters take Muon's orthogonalised step (recipe.MuonSGD)")
    muon_lr: float = setting(0.24, "Muon's rate (per step, on filters renormalised to norm sqrt(out))",
                             within="(0, 100]")
    muon_momentum: float = setting(0.6, "Muon's momentum", within="[0, 1)")
    outlier_loss: str = setting("energy", "with data.outliers: energy (Liu et al.'s hinges on -logsumexp of the "
                                          "logits) or uniform (cross-entropy to the uniform answer; docs/trust.md: "
                                          "energy won the held-out outlier classes by 2 points)",
                                choices=("energy", "uniform"))
    outlier_weight: float = setting(0.05, "the outlier loss's weight beside the classification loss (energy: 0.05, "
                                          "chosen on validation over 0.1 and 0.3, docs/trust.md; uniform was "
                                          "measured at 0.5)", within="[0, 100]")
    outlier_margins: list = setting([-6.0, -2.0], "energy: the in-scope margin, then the outliers' (Liu et al. used "
                                                  "-25, -7 for wider nets; at that scale these nets stayed at chance)")

    def check(self) -> None:
        margins = self.outlier_margins
        if not (len(margins) == 2 and all(isinstance(m, (int, float)) for m in margins) and margins[0] < margins[1]):
            raise ConfigError(f"Config key optim.outlier_margins must be two numbers, the in-scope margin below the "
                              f"outliers' (such as -25, -7), got {margins!r}.")
        if self.muon and self.recipe != "airbench":
            raise ConfigError("Config key optim.muon needs optim.recipe airbench (it replaces that recipe's filter "
                              "updates); with another recipe, add --set optim.muon=false.")


@dataclass
class TrainerSettings:
    """``trainer:``: the Lightning Trainer arguments this tool sets; None leaves Lightning's own default."""
    OWN = ("epoch_scale",)  # read by this tool (resolve_with_origins), not passed to the Trainer
    accelerator: str = setting("auto", "cpu, gpu or auto")
    devices: Any = setting("auto", "how many (or which) devices of the accelerator")
    num_nodes: int = setting(1, "machines of a DDP run", within="[1, 4096]")
    strategy: Any = setting("auto", "auto, ddp, ddp_spawn, ...: Lightning's strategy")
    precision: str = setting("auto", "auto (hardware.auto_precision: bf16-mixed where it measures faster), "
                                     "32-true, bf16-mixed or 16-mixed")
    max_epochs: Optional[int] = setting(None, "epochs of the run: part of a family's recipe, so each model YAML "
                                              "must set it", within="[1, 100000]")
    epoch_scale: float = setting(1.0, "every family's max_epochs x this, rounded (at least 1): 0.6 fits a run on "
                                      "CIFAR + photos + outliers into the CIFAR-only time (docs/training.md)",
                                 within="(0, 100]")
    max_time: Optional[str] = setting(None, "stop after this long (DD:HH:MM:SS)")
    num_sanity_val_steps: int = setting(0, "validation batches run before training (0: none)")
    benchmark: Optional[bool] = setting(None, "cuDNN picks the fastest kernels for fixed shapes (GPU)")
    deterministic: Optional[bool] = setting(None, "deterministic algorithms only (slower)")
    log_every_n_steps: Optional[int] = setting(None, "how often the step metrics are logged")
    limit_train_batches: Any = setting(None, "train on this many (or this share of) batches per epoch")
    limit_val_batches: Any = setting(None, "validate on this many (or this share of) batches")
    gradient_clip_val: Optional[float] = setting(None, "clip gradients to this norm")
    accumulate_grad_batches: int = setting(1, "sum gradients over this many batches per step", within="[1, 1024]")

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments for ``L.Trainer`` (None left out, so Lightning's default applies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None and f.name not in self.OWN}


@dataclass
class ModelSettings:
    """``model:``: which network (configs/model/<family>.yaml)."""
    arch: str = setting("", "the architecture's registered name (pipeline.models)")
    args: dict = setting({}, "the architecture's keyword arguments")
    tta: int = setting(0, "test-time augmentation inside model.onnx: 0 off, 1 flip, 2 flip + one-pixel shifts",
                       choices=(0, 1, 2))
    module: str = setting("", "a module to import that registers the architecture (a family outside the package)")


@dataclass
class TrackingSettings:
    """``tracking:``: where runs and models go in MLflow."""
    experiment: str = setting("cifar4", "the MLflow experiment of every run")
    registered_model: str = setting("cifar4-classifier", "the registered model the champion is a version of")
    alias: str = setting("champion", "the alias that points at the best run's model")
    system_metrics_interval_s: float = setting(10.0, "CPU, memory (and GPU) sampled as system/* metrics this often",
                                               within="(0, 3600]")


@dataclass
class CheckpointSettings:
    """``checkpoint:``: how often a run saves, and which weights it logs."""
    every_n_epochs: int = setting(1, "best/last checkpoints this often (the last epoch always)", within="[1, 10000]")
    select: str = setting("last", "the model a run logs: last (final weights) or best (highest val/acc epoch)",
                          choices=("last", "best"))


@dataclass
class CalibrationSettings:
    """``calibration:``: how probabilities are made honest after training."""
    temperature: bool = setting(True, "fit softmax(logits / T) on the validation split; T goes into model.onnx")
    balance_sources: bool = setting(True, "with several sources, T minimises the mean over sources of the validation "
                                          "NLL, so the largest source does not set it alone (false: the pooled NLL)")
    by_confidence: str = setting("auto", "T grows with the image's top logit, T0 x exp(slope x its z-score), both "
                                       "fitted: auto (after the uniform outlier loss, which leaves the net too flat "
                                       "where unsure), always or never (docs/trust.md: there ECE 0.032 -> 0.026 "
                                       "CIFAR, 0.057 -> 0.046 photos; elsewhere slope ~0)",
                                 choices=("auto", "always", "never"))


@dataclass
class OutOfScopeSettings:
    """``out_of_scope:``: the score that flags images of none of the classes, and its threshold."""
    score: str = setting("combined", "energy, knn, or combined (the larger of the two in validation standard "
                                     "deviations; docs/trust.md)", choices=("combined", "energy", "knn"))
    k: int = setting(10, "knn, combined: which neighbour", within="[1, 1000]")
    bank_size: int = setting(4000, "knn, combined: training images whose features sit in model.onnx",
                             within="[1, 1000000]")
    knn_margin: float = setting(1.0, "combined: the distance counts only this many validation standard deviations "
                                     "above energy's, a guard for noise (0 before; 1 chosen on validation with "
                                     "outliers in training, docs/trust.md)", within="[0, 100]")
    keep: float = setting(0.95, "the threshold keeps this share of each source's validation images in scope",
                          within="[0.5, 1)")


@dataclass
class EvaluationSettings:
    """``evaluation:``: extra folders scored after training."""
    folders: dict = setting({}, "name: folder, logged as eval/<name>/...; subfolders named after the classes make "
                                "it labelled, any other folder is taken as out of scope")

    def check(self) -> None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.folders.items()):
            raise ConfigError(f"Config key evaluation.folders must map names to folder paths, got {self.folders!r}.")


@dataclass
class Config:
    """A run's whole config: the top-level keys and one typed section each."""
    family: str = setting("", "the model family (configs/model/<family>.yaml)")
    profile: str = setting("", "the machine's profile", choices=("",) + PROFILES)
    seed: int = setting(42, "the run's seed: weights, batch order, augmentations (data.seed draws the splits)")
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    out_of_scope: OutOfScopeSettings = field(default_factory=OutOfScopeSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    def to_dict(self) -> dict[str, Any]:
        """The plain form: saved with every run as config.yaml, hashed for resume, flattened into params."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        """Check every key (unknown ones get the closest known names) and build the typed config."""
        return _build(cls, raw or {}, "")


SECTIONS = {f.name: f.default_factory for f in fields(Config) if f.default_factory is not MISSING}


def check_section(section: Any, name: str) -> Any:
    """``section`` (a typed section built in code, e.g. with ``dataclasses.replace``) checked like a YAML one."""
    return _build(type(section), {f.name: getattr(section, f.name) for f in fields(section)}, f"{name}.")


def choices(section: type, key: str) -> tuple:
    """The allowed values of one key, as its field says."""
    return next(f.metadata["choices"] for f in fields(section) if f.name == key)


def _build(kind: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"Config key {prefix.rstrip('.')!r} must be a section of keys, got {raw!r}.")
    known = {f.name: f for f in fields(kind)}
    hints = get_type_hints(kind)
    values = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in known:
            choices = [f"{prefix}{k}" for k in known]
            close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else f"known keys: {', '.join(sorted(choices))}."
            raise ConfigError(f"Unknown config key {name}: {hint}")
        if is_dataclass(hints[key]):
            values[key] = _build(hints[key], value if value is not None else {}, f"{name}.")
            continue
        _check_value(name, value, hints[key], known[key].metadata)
        values[key] = value
    built = kind(**values)
    if hasattr(built, "check"):
        built.check()
    return built


def _check_value(name: str, value: Any, hint: Any, metadata) -> None:
    if not _fits(value, hint):
        raise ConfigError(f"Config key {name} must be {_type_name(hint)}, got {value!r}.")
    choices = metadata.get("choices") or ()
    if choices and not any(value == c and type(value) is type(c) for c in choices):
        shown = " or ".join("true" if c is True else "false" if c is False else str(c) for c in choices if c != "")
        raise ConfigError(f"Config key {name} must be {shown}, got {value!r}.")
    within = metadata.get("within")
    if within and value is not None:
        low, high = (float(x) for x in within[1:-1].split(","))
        inside = (low <= value if within[0] == "[" else low < value) and \
                 (value <= high if within[-1] == "]" else value < high)
        if not inside:
            raise ConfigError(f"Config key {name} must be in {within}, got {value!r}.")


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    names = {bool: "true/false", int: "a whole number", float: "a number", str: "text", list: "a list",
             dict: "a section", type(None): "empty"}
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(names.get(a, str(a)) for a in get_args(hint) if a is not type(None))
    return names.get(hint, str(hint))


def describe(config: Config, origins: dict[str, str]) -> list[tuple[str, Any, str, str]]:
    """(key, value, where it came from, meaning) of every key of a resolved config, for ``pipeline config``."""
    rows = []
    for section in fields(Config):
        node = getattr(config, section.name)
        keys = [(f"{section.name}.{f.name}", f, getattr(node, f.name)) for f in fields(node)] if is_dataclass(node) \
            else [(section.name, section, node)]
        for name, spec, value in keys:
            where = origins.get(name) or next((o for k, o in origins.items() if k.startswith(name + ".")), "default")
            rows.append((name, value, where, spec.metadata.get("meaning", "")))
    return rows


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
