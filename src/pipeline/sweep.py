"""Hyperparameter sweeps: an Optuna study whose trials are nested MLflow runs under one parent run.

``pipeline sweep --family vgg --trials 20`` (``make sweep``) samples the config paths listed in
``configs/sweep/<family>.yaml`` (or, without that file, the family's learning rate, weight decay and
epochs around their configured values) with TPE, trains each trial with the same code as ``make train``
(same logging, same test split), and stops bad trials early with a median pruner on the
per-epoch validation accuracy. The study lives in ``optuna.db`` next to ``mlflow.db``: a killed
sweep started again with the same command continues it, and re-runs the trial that was cut off.
The parent run logs the best parameters and Optuna's plots; the champion rule of ``make train``
then runs over the experiment, so the best trial can become the champion.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import lightning as L
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import SECTIONS, Config, config_dir, resolve_config
from pipeline.errors import ConfigError
from pipeline.tracking import project_dir

STORAGE_FILE = "optuna.db"
KINDS = ("float", "int", "choice")


@dataclass
class SweepResult:
    study: str
    parent_run_id: str
    best_trial: Optional[int]
    best_value: Optional[float]
    best_params: dict[str, Any]
    best_run_id: Optional[str]
    completed: int
    pruned: int


def default_space(base: Config) -> dict:
    """The search space of a family without ``configs/sweep/<family>.yaml``: its learning rate and weight
    decay from a third to three times the configured values (log scale), and its epochs +/- a third."""
    lr, decay, epochs = base.optim.lr, base.optim.weight_decay, base.trainer.max_epochs
    params = {"optim.lr": {"float": [lr / 3, lr * 3], "log": True},
              "optim.weight_decay": {"float": [decay / 3, decay * 3], "log": True},
              "trainer.max_epochs": {"int": [max(1, round(epochs * 2 / 3)), max(2, round(epochs * 4 / 3))]}}
    return {"params": params, "pruner": {"startup_trials": 3, "warmup_epochs": max(1, epochs // 5)}}


def load_space(family: str, fixed_epochs: bool, directory: Path | None = None,
               base: Config | None = None) -> tuple[dict, dict]:
    """(params, pruner) of ``configs/sweep/<family>.yaml`` (else :func:`default_space` of the family's
    config ``base``), checked against the config schema."""
    path = (directory or config_dir()) / "sweep" / f"{family}.yaml"
    if path.exists():
        spec = yaml.safe_load(path.read_text()) or {}
    elif base is not None:
        spec = default_space(base)
    else:
        raise ConfigError(f"No search space {str(path)!r} for family {family!r}, and no config to derive one from.")
    params, pruner = dict(spec.get("params") or {}), dict(spec.get("pruner") or {})
    known = {f"{section}.{f.name}" for section, kind in SECTIONS.items() for f in fields(kind())}
    for key, rule in params.items():
        if key not in known:
            raise ConfigError(f"{path}: {key!r} is not a config key that a sweep can set.")
        kinds = [kind for kind in KINDS if kind in (rule or {})]
        if len(kinds) != 1:
            raise ConfigError(f"{path}: {key} needs exactly one of float: [low, high], int: [low, high] "
                              f"or choice: [...], got {rule!r}.")
    if fixed_epochs:
        params.pop("trainer.max_epochs", None)
    return params, pruner


def suggest(trial, key: str, rule: dict) -> Any:
    if "float" in rule:
        low, high = rule["float"]
        return trial.suggest_float(key, float(low), float(high), log=bool(rule.get("log")))
    if "int" in rule:
        low, high = rule["int"]
        return trial.suggest_int(key, int(low), int(high), log=bool(rule.get("log")))
    return trial.suggest_categorical(key, list(rule["choice"]))


class PruneOnValAcc(L.Callback):
    """Report each epoch's val/acc to the trial; once Optuna says prune, stop the fit after that epoch."""

    def __init__(self, trial) -> None:
        self.trial, self.pruned = trial, False

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/acc" not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics["val/acc"]), step=trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned, trainer.should_stop = True, True


def _parent_run(client: MlflowClient, experiment_id: str, study: str, family: str) -> str:
    """The study's parent run: the unfinished one of an interrupted sweep, or a new one."""
    found = client.search_runs([experiment_id], f"tags.sweep_study = '{study}' and attributes.status != 'FINISHED'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"sweep {family}",
                            tags={"sweep_study": study, "family": family, "kind": "sweep"})
    return run.info.run_id


def _requeue_cut_off_trials(study) -> int:
    """Trials left RUNNING by a killed sweep: mark them failed and queue their parameters again."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
    return len(stale)


def run_sweep(family: str, trials: int, profile: str, data_dir: str, experiment: str, experiment_id: str,
              tracking_uri: str, overrides: list[str], epochs: Optional[int] = None,
              study_name: Optional[str] = None, console=None) -> SweepResult:
    import optuna
    from optuna.trial import TrialState

    from pipeline.train import train_family

    base = resolve_config(family, profile, overrides)  # fails now, in one sentence, on a bad --set
    params, pruner_spec = load_space(family, fixed_epochs=epochs is not None, base=base)
    study_name = study_name or f"{experiment}-{family}-{profile}" + (f"-{epochs}ep" if epochs else "")
    storage = f"sqlite:///{(project_dir() / STORAGE_FILE).resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name, storage=storage, load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=base.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=int(pruner_spec.get("startup_trials", 3)),
                                           n_warmup_steps=int(pruner_spec.get("warmup_epochs", 1))),
    )
    requeued = _requeue_cut_off_trials(study)
    client = MlflowClient(tracking_uri)
    parent = _parent_run(client, experiment_id, study_name, family)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    remaining = max(0, trials - done)
    if console is not None:
        console.print(f"Sweep [bold]{study_name}[/] ({storage}): {done} trial(s) done, {remaining} to run"
                      + (f", {requeued} cut-off trial(s) queued again" if requeued else "")
                      + f"; parent MLflow run {parent}")

    def objective(trial) -> float:
        values = {key: suggest(trial, key, rule) for key, rule in params.items()}
        extra = [f"{key}={value}" for key, value in values.items()]
        if epochs is not None:
            extra.append(f"trainer.max_epochs={epochs}")
        config = resolve_config(family, profile, [*overrides, *extra])
        pruning = PruneOnValAcc(trial)
        result = train_family(config, data_dir, experiment, tracking_uri, parent_run_id=parent,
                              run_name=f"{family} trial {trial.number}",
                              tags={"sweep_study": study_name, "sweep_trial": str(trial.number)},
                              callbacks=(pruning,))
        trial.set_user_attr("run_id", result.run_id)
        if result.pruned:
            raise optuna.TrialPruned(f"val acc {result.val_acc:.4f} below the median at the same epoch")
        if result.test_acc is not None:
            trial.set_user_attr("test_acc", result.test_acc)
        return result.val_acc

    if remaining:
        study.optimize(objective, n_trials=remaining, catch=())
    return _log_parent(client, study, parent, family, study_name, storage)


def _log_parent(client: MlflowClient, study, parent: str, family: str, study_name: str, storage: str) -> SweepResult:
    """Best parameters, a table of the trials and Optuna's plots on the parent run; then it is finished."""
    import matplotlib
    import optuna

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    best = max(complete, key=lambda t: t.value) if complete else None
    client.log_param(parent, "sweep.storage", storage)
    client.log_param(parent, "sweep.study", study_name)
    client.log_metric(parent, "sweep_trials_complete", len(complete))
    client.log_metric(parent, "sweep_trials_pruned", len(pruned))
    if best is not None:
        client.log_metric(parent, "best_trial_val_acc", best.value)
        client.set_tag(parent, "best_trial", str(best.number))
        client.set_tag(parent, "best_trial_run_id", str(best.user_attrs.get("run_id", "")))
        from mlflow.entities import Param

        logged = client.get_run(parent).data.params
        client.log_batch(parent, params=[Param(f"best.{key}", str(value)) for key, value in best.params.items()
                                         if f"best.{key}" not in logged])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
        frame.to_csv(folder / "trials.csv", index=False)
        plots = [("optimization_history.png", optuna_plots.plot_optimization_history)]
        if len(complete) >= 2:
            plots.append(("param_importances.png", optuna_plots.plot_param_importances))
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in plots:
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as error:  # e.g. importances when every trial drew the same values
                print(f"note: no {name} for this sweep: {error}")
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            figure.savefig(folder / name, dpi=110)
            plt.close(figure)
        for path in sorted(folder.iterdir()):
            client.log_artifact(parent, str(path), artifact_path="sweep")
    client.set_terminated(parent, "FINISHED")
    return SweepResult(study_name, parent, best.number if best else None, best.value if best else None,
                       dict(best.params) if best else {}, best.user_attrs.get("run_id") if best else None,
                       len(complete), len(pruned))
