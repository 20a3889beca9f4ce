"""Where runs go: the MLflow tracking URI, experiments and a reachability check."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


# MLflow 3's UI opens an experiment in "Model training" mode, not GenAI mode, with this tag.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; the message names the URI."""


def project_dir() -> Path:
    return Path(os.environ.get("PIPELINE_HOME", Path.cwd()))


def default_tracking_uri() -> str:
    return f"sqlite:///{project_dir().resolve() / 'mlflow.db'}"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else an embedded sqlite store in the project folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def check_tracking(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, in one sentence, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"answered {response.status}"
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        problem = str(getattr(error, "reason", error))
    raise TrackingError(f"MLflow tracking server {uri} is unreachable ({problem}).")


def process_rank() -> int:
    """The global rank that torchrun, SLURM or Lightning's DDP launcher gave this process (0 when alone)."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def setup_tracking(experiment: str, nodes: int = 1, wait_s: float = 120.0) -> tuple[str, str]:
    """Point mlflow at the tracking store and return ``(uri, experiment_id)``.

    Only rank 0 creates the store and the experiment; the other ranks wait for them, so that several
    processes never create one sqlite file at once. A sqlite store cannot be shared by several nodes.
    """
    uri = tracking_uri()
    if nodes > 1 and uri.startswith("sqlite:"):
        raise TrackingError(f"Training on {nodes} nodes cannot share the sqlite store {uri}: set "
                            "MLFLOW_TRACKING_URI to an MLflow server that every node can reach.")
    check_tracking(uri)
    mlflow.set_tracking_uri(uri)
    if process_rank() != 0:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                found = MlflowClient(uri).get_experiment_by_name(experiment)
            except Exception:  # the store may not exist yet
                found = None
            if found is not None:
                return uri, found.experiment_id
            if time.monotonic() > deadline:
                raise TrackingError(f"Rank {process_rank()} waited {wait_s:.0f} s for rank 0 to create "
                                    f"experiment {experiment!r} in {uri}.")
            time.sleep(0.5)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return uri, found.experiment_id
    artifact_location = None
    if uri == default_tracking_uri():
        # Artifacts beside the database, not in MLflow's ./mlruns of whatever folder runs it.
        artifact_location = (project_dir() / "mlartifacts").resolve().as_uri()
    try:
        return uri, client.create_experiment(experiment, artifact_location=artifact_location,
                                             tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except MlflowException:
        # Another node's rank 0 (each node has one) created it first on the shared server.
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return uri, found.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
