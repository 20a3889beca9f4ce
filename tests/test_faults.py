"""Training faults and safe loading: killed runs resume, a dead tracking server is one sentence,
no code is unpickled when a model is loaded."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.export import rebuild_classifier


# The resume tests' run: a narrow ResNet-9 with the full recipe (whitening, Muon, lookahead), killed after
# two of its epochs; each epoch writes the checkpoints and logs, so every one of them counts.
EPOCHS = 16
RESUMABLE = ["--models", "resnet", "--epochs", str(EPOCHS), "--set", "data.batch_size=32",
             "--set", "model.args.widths=[16,32,32]"]


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EXPLOIT_MARKER', '/tmp/pwned')}",))


def wait_for_epochs(process: subprocess.Popen, checkpoints: Path, epochs: int, timeout: float = 180) -> None:
    """Until ``last.ckpt`` has been rewritten ``epochs`` times (one per finished epoch)."""
    seen: set[int] = set()
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and len(seen) < epochs:
        for last in checkpoints.glob("*/last.ckpt"):
            try:
                seen.add(last.stat().st_mtime_ns)
            except FileNotFoundError:
                pass
        time.sleep(0.05)
    assert process.poll() is None, "training ended before it could be interrupted"
    assert len(seen) >= epochs, "no checkpoints appeared"


def test_a_crafted_pickle_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    weights = tmp_path / "weights.pt"
    torch.save({"net.weight": Exploit()}, weights)
    metadata = {"arch": "lenet", "classes": ["a", "b"], "mean": [0.5] * 3, "std": [0.2] * 3, "model_args": {}}
    with pytest.raises(pickle.UnpicklingError):
        rebuild_classifier(weights, metadata)
    assert not marker.exists()


def test_unreachable_tracking_server_is_one_sentence_in_seconds(toy_folder, isolated_project):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    uri = f"http://127.0.0.1:{port}"
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", "--data", str(toy_folder), "--models", "lenet"],
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=60,
                            cwd=isolated_project)
    assert result.returncode == 2
    # A refused connection fails the health check at once; what the bound allows for is Python importing
    # torch and Lightning (5 s here, 15 s on a loaded 2-core machine). MLflow's own retries take minutes.
    assert time.time() - started < 30
    assert f"MLflow tracking server {uri} is unreachable" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_killed_run_resumes_into_the_same_mlflow_run(toy_folder, isolated_project):
    args = [sys.executable, "-m", "pipeline", "train", "--data", str(toy_folder), *RESUMABLE]
    env = {**os.environ, "PIPELINE_HOME": str(isolated_project)}
    process = subprocess.Popen(args, env=env, cwd=isolated_project, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = isolated_project / "checkpoints" / "cifar4"
    wait_for_epochs(process, checkpoints, 2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    client = MlflowClient(f"sqlite:///{isolated_project / 'mlflow.db'}")
    (killed,) = client.search_runs([client.get_experiment_by_name("cifar4").experiment_id])
    assert killed.info.status == "RUNNING"  # nobody could mark it otherwise
    done = len(client.get_metric_history(killed.info.run_id, "val/acc"))
    assert 2 <= done < EPOCHS

    resumed = subprocess.run([*args, "--resume"], env=env, cwd=isolated_project, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "Resuming resnet run" in resumed.stdout
    (run,) = client.search_runs([client.get_experiment_by_name("cifar4").experiment_id])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val/acc")
    steps = [m.step for m in history]
    assert len(history) == EPOCHS and len(set(steps)) == EPOCHS, steps  # every epoch, once each
    assert run.data.metrics["best_val_acc"] > 0.5
    assert client.get_model_version_by_alias("cifar4-classifier", "champion").run_id == run.info.run_id


def start_mlflow_server(store: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                import urllib.request

                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    os.killpg(server.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not start")


@pytest.mark.slow
def test_tracking_server_lost_mid_run_keeps_checkpoints_and_resumes(toy_folder, isolated_project):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = isolated_project / "server-store"
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PIPELINE_HOME": str(isolated_project),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    args = [sys.executable, "-m", "pipeline", "train", "--data", str(toy_folder), *RESUMABLE]
    server = start_mlflow_server(store, port)
    try:
        training = subprocess.Popen(args, env=env, cwd=isolated_project, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        checkpoints = isolated_project / "checkpoints" / "cifar4"
        wait_for_epochs(training, checkpoints, 2)
        os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-run
        server.wait()
        out, err = training.communicate(timeout=300)
        assert training.returncode == 3, out[-2000:] + err[-2000:]
        assert f"MLflow at {uri} failed" in err and "RESUME=1" in err
        assert list(checkpoints.glob("*/last.ckpt")), "checkpoints were lost"

        server = start_mlflow_server(store, port)  # back again: the run continues where it stopped
        resumed = subprocess.run([*args, "--resume"], env=env, cwd=isolated_project, capture_output=True, text=True,
                                 timeout=300)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("cifar4").experiment_id])
        assert run.info.status == "FINISHED" and run.data.metrics["best_val_acc"] > 0.5
    finally:
        os.killpg(server.pid, signal.SIGKILL)


def test_a_model_whose_classes_do_not_match_its_metadata_is_refused(tmp_path):
    from pipeline.export import export_onnx
    from pipeline.models import build_model
    from pipeline.module import Classifier
    from pipeline.runtime.model_folder import ModelError
    from pipeline.runtime.onnx_model import OnnxClassifier

    onnx_path = export_onnx(Classifier(build_model("lenet", 4), [0.5] * 3, [0.2] * 3), 32, tmp_path / "model.onnx")
    metadata = {"classes": ["cat", "dog", "bird"], "image_size": 32}  # 3 names for a 4-way output
    with pytest.raises(ModelError, match="outputs 4 classes but its metadata names 3"):
        OnnxClassifier(onnx_path, metadata)


def test_packaging_without_a_champion_is_one_sentence(isolated_project, capsys):
    from pipeline.cli import main

    assert main(["package"]) == 2
    err = capsys.readouterr().err
    assert "No registered model models:/cifar4-classifier@champion" in err and "train first" in err
