"""CLASSIFIER_FOLLOW: a real `bentoml serve` follows a registry alias on a real `mlflow server`.

Training logs through the server (artifacts proxied over HTTP), the service starts from the
alias's model, swaps in a new version when the alias moves while requests keep coming, refuses
a version whose files fail their checksums or whose classes differ, and keeps answering while
the tracking server is down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port
from toy_data import make_image_folder

pytestmark = pytest.mark.slow
NAME = "cifar4-classifier"


def start_mlflow(folder: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(folder / f"mlflow-{port}.log", "a")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(f"http://127.0.0.1:{port}/health", server, 60)
    return server


def wait_for(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert process.poll() is None, f"{process.args[0]} exited"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} not up in {seconds} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def poll(check, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"not within {seconds} s: {what}")


def test_the_service_follows_the_alias(served, toy_folder, tmp_path):
    _, _, served_project = served  # its BentoML store holds the bento that runs here
    mlflow_dir, project = tmp_path / "mlflow", tmp_path / "project"
    mlflow_dir.mkdir()
    project.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow(mlflow_dir, port)
    service = None
    try:
        env = {**os.environ, "PIPELINE_HOME": str(project), "PIPELINE_CACHE_DIR": str(project / "cache"),
               "MLFLOW_TRACKING_URI": uri}

        def pipeline(*args: str) -> str:
            result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=project, env=env,
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            return result.stdout

        three = make_image_folder(tmp_path / "three", per_class=40, classes=("bird", "boat", "cat"))
        for data, registered in ((toy_folder, NAME), (three, "three-classes")):
            pipeline("train", "--data", str(data), "--models", "lenet", "--epochs", "2",
                     "--set", "data.batch_size=32", "--registered-model", registered)
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("cifar4").experiment_id],
                                  order_by=["attributes.start_time ASC"])
        assert all(any(k.startswith("checksum.") for k in r.data.tags) for r in runs)  # recorded at training
        # v1 (registered by training) and v2: the 4-class run, registered again, so that the alias can move
        # between versions; v3: the 3-class run under the same name.
        mlflow.set_tracking_uri(uri)
        first = str(client.get_model_version_by_alias(NAME, "champion").version)
        second = str(mlflow.register_model(runs[0].data.tags["model_uri"], NAME).version)
        three_class = str(mlflow.register_model(runs[1].data.tags["model_uri"], NAME).version)
        assert len({first, second, three_class}) == 3

        service_port = free_port()
        url = f"http://127.0.0.1:{service_port}"
        # Its own BentoML home over the same store: `bentoml serve` empties its home's
        # prometheus_multiproc_dir at start, which would wipe the session server's /metrics counts.
        home = tmp_path / "bentoml"
        home.mkdir()
        for store in ("bentos", "models"):
            (home / store).symlink_to(served_project / "bentoml" / store)
        service_env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
                       "MLFLOW_TRACKING_URI": uri, "CLASSIFIER_FOLLOW": f"models:/{NAME}@champion",
                       "CLASSIFIER_FOLLOW_INTERVAL_S": "1", "TMPDIR": str(tmp_path)}
        log = open(tmp_path / "serve.log", "w")
        service = subprocess.Popen(
            [str(Path(sys.executable).parent / "bentoml"), "serve", "cifar4_classifier:latest", "--host",
             "127.0.0.1", "--port", str(service_port)],
            cwd=tmp_path, env=service_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(f"{url}/readyz", service, 90)
        image = sorted((toy_folder / "boat").glob("*.jpg"))[0].read_bytes()

        def classify() -> dict:
            response = httpx.post(f"{url}/classify", files={"image": ("boat.jpg", image, "image/jpeg")}, timeout=30)
            assert response.status_code == 200, response.text
            return response.json()

        model = httpx.get(f"{url}/model").json()
        assert model["model_version"] == first and model["follow"]["tracking_server"] == "reachable"
        assert classify()["model"]["version"] == first

        # Requests the whole time; the alias moves; the new version answers within the interval.
        failures, answers, running = [], [], True

        def load() -> None:
            with httpx.Client(timeout=30) as http:
                while running:
                    try:
                        response = http.post(f"{url}/classify", files={"image": ("b.jpg", image, "image/jpeg")})
                        (answers if response.status_code == 200 else failures).append(response)
                    except httpx.HTTPError as error:
                        failures.append(error)

        threads = [threading.Thread(target=load) for _ in range(8)]
        for thread in threads:
            thread.start()
        out = pipeline("champion", "--version", second)
        moved = time.time()  # the alias has moved: from here the service has its follow interval (1 s) to notice
        assert f"moved from version {first}" in out
        poll(lambda: all(classify()["model"]["version"] == second for _ in range(6)), 15, "version 2 answers")
        swap_seconds = time.time() - moved
        running = False
        for thread in threads:
            thread.join()
        assert not failures and len(answers) > 20, failures[:3]
        assert {a.json()["model"]["version"] for a in answers} <= {first, second}
        assert swap_seconds < 10

        # Refused: a corrupted model.onnx (its checksum no longer matches), and a model with other classes.
        model_id = client.get_model_version(NAME, first).source.removeprefix("models:/")
        (stored,) = (mlflow_dir / "artifacts").rglob(f"{model_id}/artifacts/model.onnx")
        original = stored.read_bytes()
        stored.write_bytes(original[:-64] + b"\0" * 64)
        client.set_registered_model_alias(NAME, "champion", first)
        refusal = poll(lambda: httpx.get(f"{url}/model").json()["follow"]["last_refusal"], 10, "refusal")
        assert refusal["version"] == first and "checksum" in refusal["reason"]
        stored.write_bytes(original)  # v2 shares these files; a version registered later may use them again
        client.set_registered_model_alias(NAME, "champion", three_class)
        refusal = poll(lambda: (r := httpx.get(f"{url}/model").json()["follow"]["last_refusal"])
                       and r["version"] == three_class and r, 10, "class refusal")
        assert "classes" in refusal["reason"] and classify()["model"]["version"] == second
        metrics = httpx.get(f"{url}/metrics").text
        assert 'classifier_model_follow_events_total{event="refusal"}' in metrics
        assert 'classifier_model_follow_events_total{event="swap"}' in metrics

        # The tracking server goes away: the service keeps answering and says so; then it comes back.
        stop(server)
        poll(lambda: httpx.get(f"{url}/model").json()["follow"]["tracking_server"] == "unreachable", 10,
             "unreachable reported")
        assert classify()["model"]["version"] == second
        server = start_mlflow(mlflow_dir, port)
        poll(lambda: httpx.get(f"{url}/model").json()["follow"]["tracking_server"] == "reachable", 15,
             "reachable again")
        mlflow.set_tracking_uri(uri)
        fourth = str(mlflow.register_model(runs[0].data.tags["model_uri"], NAME).version)
        client.set_registered_model_alias(NAME, "champion", fourth)
        poll(lambda: all(classify()["model"]["version"] == fourth for _ in range(6)), 15, "following resumed")
        text = (tmp_path / "serve.log").read_text()
        assert "now serving version" in text and "Refused" in text and "cannot be reached" in text
    finally:
        if service is not None:
            stop(service)
        stop(server)
