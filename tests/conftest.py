from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from toy_data import make_image_folder  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_project(tmp_path, monkeypatch):
    """Every test gets its own project folder, cache and no inherited tracking URI."""
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path))
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory) -> Path:
    """240 learnable images: one coloured shape per class, JPEG and PNG."""
    return make_image_folder(tmp_path_factory.mktemp("toy") / "images", per_class=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def served(tmp_path_factory, toy_folder):
    """Train LeNet on the toy set, package it, serve the bento; yield (url, in-process model, project)."""
    project = tmp_path_factory.mktemp("served")
    env = {**os.environ, "PIPELINE_HOME": str(project), "PIPELINE_CACHE_DIR": str(project / "cache"),
           "BENTOML_HOME": str(project / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "CLASSIFIER_MAX_BODY_BYTES": str(2 * 1024 * 1024), "CLASSIFIER_READ_TIMEOUT_S": "3",
           "TMPDIR": str(project / "server-tmp")}
    (project / "server-tmp").mkdir()
    env.pop("MLFLOW_TRACKING_URI", None)
    run = lambda *args: subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=project, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=600)
    for args in (("train", "--data", str(toy_folder), "--models", "lenet", "--epochs", "6",
                  "--set", "data.batch_size=32"), ("package",)):
        result = run(*args)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    port = free_port()
    log = open(project / "serve.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", "cifar4_classifier:latest",
         "--host", "127.0.0.1", "--port", str(port), "--timeout-keep-alive", "75"],
        cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (project / "serve.log").read_text()[-3000:]
            time.sleep(0.3)
        else:
            pytest.fail("service not ready in 60 s: " + (project / "serve.log").read_text()[-3000:])
        mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
        from pipeline.runtime.onnx_model import OnnxClassifier

        model = OnnxClassifier.from_mlflow("models:/cifar4-classifier@champion")
        yield url, model, project
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
