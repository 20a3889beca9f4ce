"""Pick the best finished run and point the registry alias (``champion``) at it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from rich.table import Table

# The mean over the run's training sources of validation accuracy (with one source: its validation accuracy),
# so that a family better on the largest source and worse on the others does not win by that source's size.
METRIC = "val_acc_source_mean"


@dataclass
class ChampionDecision:
    best_run_id: Optional[str]
    best_val_acc: Optional[float]
    previous_val_acc: Optional[float]
    version: Optional[str]
    promoted: bool
    table: Table

    def sentence(self, name: str, alias: str) -> str:
        """What happened to ``name@alias``, in one line (Rich markup)."""
        if self.promoted:
            return (f"[bold green]{name}@{alias}[/] -> version {self.version} "
                    f"(val acc {self.best_val_acc:.4f}, was {self.previous_val_acc})")
        return (f"{name}@{alias} stays at version {self.version} (val acc {self.previous_val_acc}); "
                f"best run now {self.best_val_acc}")


def candidate_runs(client: MlflowClient, experiment_id: str):
    """Finished runs that logged an MLflow Model, best validation accuracy first."""
    runs = client.search_runs(
        [experiment_id], f"attributes.status = 'FINISHED' and metrics.{METRIC} > 0",
        order_by=[f"metrics.{METRIC} DESC", "attributes.start_time DESC"], max_results=200,
    )
    return [run for run in runs if run.data.tags.get("model_uri")]


def current_champion(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def comparison_table(runs, champion_run_id: Optional[str], limit: int = 15) -> Table:
    table = Table(title="Runs of the experiment by validation accuracy")
    for column in ("run", "family", "arch args", "params", "epochs", "val acc", "test acc", ""):
        table.add_column(column, justify="right" if column in ("params", "epochs", "val acc", "test acc") else "left")
    for run in runs[:limit]:
        params, tags = run.data.params, run.data.tags
        table.add_row(
            run.info.run_id[:8], tags.get("family", "?"),
            " ".join(f"{k[len('model.args.'):]}={v}" for k, v in sorted(params.items()) if k.startswith("model.args.")),
            params.get("n_parameters", ""), params.get("trainer.max_epochs", ""),
            f"{run.data.metrics[METRIC]:.4f}",
            f"{run.data.metrics['test_acc']:.4f}" if "test_acc" in run.data.metrics else "",
            "champion" if run.info.run_id == champion_run_id else "",
        )
    return table


def version_tags(run) -> dict[str, str]:
    """What a registered version says about itself: family, accuracies, data and code."""
    metrics, tags, params = run.data.metrics, run.data.tags, run.data.params
    return {
        "family": tags.get("family", ""), "arch": params.get("model.arch", ""),
        "val_acc": f"{metrics[METRIC]:.4f}",
        "test_acc": f"{metrics['test_acc']:.4f}" if "test_acc" in metrics else "no test split",
        "data_digest": tags.get("data_fingerprint", ""), "git_commit": tags.get("git_commit", ""),
        "run_id": run.info.run_id,
    }


def promote_champion(client: MlflowClient, experiment_id: str, name: str, alias: str) -> ChampionDecision:
    """Register the best run's model and move ``alias`` to it when it beats the current champion."""
    runs = candidate_runs(client, experiment_id)
    champion = current_champion(client, name, alias)
    previous = None
    if champion is not None:
        previous = client.get_run(champion.run_id).data.metrics.get(METRIC) if champion.run_id else None
    if not runs:
        return ChampionDecision(None, None, previous, None, False, comparison_table([], None))
    best = runs[0]
    best_acc = best.data.metrics[METRIC]
    if champion is not None and (champion.run_id == best.info.run_id or (previous is not None and best_acc <= previous)):
        return ChampionDecision(best.info.run_id, best_acc, previous, champion.version, False,
                                comparison_table(runs, champion.run_id))
    mlflow.set_tracking_uri(client.tracking_uri)
    tags = version_tags(best)
    version = mlflow.register_model(best.data.tags["model_uri"], name, tags=tags)
    client.update_model_version(name, version.version, description=(
        f"{tags['family']} ({tags['arch']}), validation accuracy {tags['val_acc']}, test accuracy {tags['test_acc']} "
        f"on a split that training and selection never saw; data {tags['data_digest']}, commit {tags['git_commit']}."))
    client.set_registered_model_alias(name, alias, version.version)
    return ChampionDecision(best.info.run_id, best_acc, previous, version.version, True,
                            comparison_table(runs, best.info.run_id))


def crown(tracking_uri: str, experiment_id: str, name: str, alias: str, console) -> ChampionDecision:
    """The one champion step of ``train``, ``sweep`` and ``champion``: promote, then print the table and the decision."""
    decision = promote_champion(MlflowClient(tracking_uri), experiment_id, name, alias)
    console.print(decision.table)
    console.print(decision.sentence(name, alias))
    return decision


def move_alias(client: MlflowClient, name: str, alias: str, version: str) -> str:
    """Point ``name@alias`` at ``version`` by hand; returns a sentence saying what changed."""
    from pipeline.runtime.model_folder import ModelError

    try:
        target = client.get_model_version(name, str(version))
    except MlflowException as error:
        raise ModelError(f"{name} has no version {version} in {client.tracking_uri}.") from error
    before = current_champion(client, name, alias)
    client.set_registered_model_alias(name, alias, target.version)
    accuracy = target.tags.get("val_acc", "?")
    if before is None:
        return f"{name}@{alias} now points at version {target.version} (val acc {accuracy}); it pointed nowhere before."
    if before.version == target.version:
        return f"{name}@{alias} already pointed at version {target.version}: nothing changed."
    return (f"{name}@{alias} moved from version {before.version} (val acc {before.tags.get('val_acc', '?')}) "
            f"to version {target.version} (val acc {accuracy}).")
