"""A real `bentoml serve` of a model trained and packaged here, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.runtime.imaging import decode_image

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def toy_files(toy_folder: Path) -> list[Path]:
    return [sorted((toy_folder / c).glob(f"*.{ext}"))[0] for c in ("bird", "boat", "cat", "dog")
            for ext in ("jpg", "png")]


def test_probabilities_match_the_in_process_model(served, toy_folder):
    url, model, _ = served
    for path in toy_files(toy_folder):
        data = path.read_bytes()
        response = httpx.post(f"{url}/classify", files={"image": (path.name, data, "image/jpeg")})
        assert response.status_code == 200, response.text
        body = response.json()
        expected = model.predict_proba(decode_image(data, model.image_size))[0]
        got = np.array([body["probabilities"][name] for name in model.classes])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert abs(sum(body["probabilities"].values()) - 1) < 1e-5
        assert body["label"] == model.classes[int(expected.argmax())]
        assert body["model"]["name"] == "cifar4-classifier" and body["model"]["version"] == "1"
        # The flag is the in-process score against the threshold stored with the model.
        _, scores = model.predict(decode_image(data, model.image_size))
        assert body["out_of_scope_score"] == pytest.approx(float(scores[0]), abs=1e-5)
        assert body["out_of_scope"] is bool(scores[0] > model.scope_threshold)
        # The same bytes as a raw body give the same answer.
        raw = httpx.post(f"{url}/classify", content=data, headers={"Content-Type": "image/png"})
        assert raw.status_code == 200 and raw.json()["probabilities"] == body["probabilities"]


def answer_counts(url: str) -> dict[tuple[str, str], float]:
    """/metrics' classifier_answers_total by (label, out_of_scope), summed over the workers."""
    counts: dict[tuple[str, str], float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("classifier_answers_total{"):
            labels, value = line[len("classifier_answers_total{"):].rsplit("} ", 1)
            fields = dict(item.split("=", 1) for item in labels.split(","))
            key = (fields["label"].strip('"'), fields["out_of_scope"].strip('"'))
            counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def test_every_answer_carries_the_flag_and_metrics_count_what_users_send(served, toy_folder):
    """Whether noise is flagged is a property of the model (test_training checks it on the champion);
    here: every answer has both fields, and /metrics counts each answer once, under its label and flag."""
    url, model, _ = served
    before = answer_counts(url)
    rng = np.random.default_rng(0)
    noise = [encode(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "PNG") for _ in range(8)]
    results = httpx.post(f"{url}/classify_batch", files=[("images", (f"{i}.png", d, "image/png"))
                                                          for i, d in enumerate(noise)]).json()["results"]
    toy = [httpx.post(f"{url}/classify", files={"image": p.open("rb")}).json() for p in toy_files(toy_folder)]
    sent: dict[tuple[str, str], float] = {}
    for answer in results + toy:
        assert isinstance(answer["out_of_scope"], bool) and isinstance(answer["out_of_scope_score"], float)
        assert answer["out_of_scope"] is (answer["out_of_scope_score"] > model.scope_threshold)
        key = (answer["label"], str(answer["out_of_scope"]).lower())
        sent[key] = sent.get(key, 0.0) + 1
    after = answer_counts(url)
    assert {key: after.get(key, 0.0) - before.get(key, 0.0) for key in set(after) | set(before)
            if after.get(key, 0.0) != before.get(key, 0.0)} == sent
    assert "classifier_top_probability_bucket" in httpx.get(f"{url}/metrics").text


def test_the_model_classifies_the_toy_set(served, toy_folder):
    url, _, _ = served
    correct = 0
    files = toy_files(toy_folder)
    for path in files:
        label = httpx.post(f"{url}/classify", files={"image": path.open("rb")}).json()["label"]
        correct += label == path.parent.name
    assert correct / len(files) > 0.5  # chance is 0.25


def test_batch_keeps_order(served, toy_folder):
    url, _, _ = served
    files = toy_files(toy_folder) * 3
    response = httpx.post(f"{url}/classify_batch",
                          files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in files])
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(files)
    for path, result in zip(files, results):
        single = httpx.post(f"{url}/classify", files={"image": path.open("rb")}).json()
        assert result["probabilities"] == pytest.approx(single["probabilities"], abs=1e-6)


def test_32_concurrent_requests_all_succeed(served, toy_folder):
    url, _, _ = served
    files = toy_files(toy_folder)
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(
            lambda i: client.post(f"{url}/classify", files={"image": files[i % len(files)].read_bytes()}).status_code,
            range(96)))
    assert statuses == [200] * 96
    info = httpx.get(f"{url}/model").json()  # counters of the worker that answered
    assert info["items"] >= info["batches"] >= 0


def _bad_inputs(toy_folder: Path) -> list[tuple[str, dict, int, str]]:
    good = toy_files(toy_folder)[0].read_bytes()
    png = encode(Image.effect_noise((64, 64), 40).convert("RGB"), "PNG")
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")
    return [
        ("not an image", {"files": {"image": ("notes.txt", b"just some text", "text/plain")}}, 400, "not a readable image"),
        ("empty file", {"files": {"image": ("empty.jpg", b"", "image/jpeg")}}, 400, "empty"),
        ("truncated jpeg", {"files": {"image": ("cut.jpg", good[: len(good) // 2], "image/jpeg")}}, 400, "cut.jpg"),
        ("truncated png", {"files": {"image": ("cut.png", png[: len(png) // 2], "image/png")}}, 400, "cut.png"),
        ("missing field", {"files": {"picture": ("a.jpg", good, "image/jpeg")}}, 400, "no file field 'image'"),
        ("text field", {"data": {"image": "hello"}, "files": {"note": ("n.txt", b"x", "text/plain")}}, 400,
         "must be a file upload"),
        ("form instead of multipart", {"data": {"image": "hello"}}, 415, "Unsupported content type"),
        ("wrong content type", {"content": b'{"image": 1}', "headers": {"Content-Type": "application/json"}}, 415,
         "Unsupported content type"),
        ("empty raw body", {"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "empty"),
        ("broken multipart", {"content": b"garbage", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
         400, "multipart"),
        ("decompression bomb", {"files": {"image": ("bomb.png", bomb, "image/png")}}, 400, "over the limit"),
        ("body over the size limit", {"content": b"\0" * (3 * 1024 * 1024), "headers": {"Content-Type": "image/png"}},
         413, "over the limit"),
    ]


def assert_bad_inputs_rejected(url: str, toy_folder: Path) -> None:
    """Each bad input to ``url`` gets its 4xx and a JSON error naming the problem."""
    for name, kwargs, status, message in _bad_inputs(toy_folder):
        response = httpx.post(url, timeout=30, **kwargs)
        assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
        assert message in response.json()["error"], f"{name}: {response.text}"


def test_bad_inputs_get_4xx_json_and_the_server_stays_healthy(served, toy_folder):
    url, _, _ = served
    assert_bad_inputs_rejected(f"{url}/classify", toy_folder)
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert httpx.post(f"{url}/classify", files={"image": toy_files(toy_folder)[0].open("rb")}).status_code == 200


def test_model_endpoint_and_bentoml_pages(served):
    url, model, _ = served
    info = httpx.get(f"{url}/model").json()
    assert info["classes"] == model.classes and info["registered_model"] == "cifar4-classifier"
    assert {"mean", "std", "image_size", "arch", "model_args", "run_id", "val_acc"} <= set(info)
    assert {"temperature", "out_of_scope"} <= set(info) and info["out_of_scope"]["keep"] == 0.95
    for path in ("/livez", "/metrics", "/", "/docs.json", "/schema.json"):
        assert httpx.get(f"{url}{path}").status_code == 200, path


def test_bentoml_clients_call_every_route_by_name(served, toy_folder):
    """BentoML's own clients read /schema.json and get the same answers as a plain multipart POST."""
    import asyncio

    import bentoml

    url, model, _ = served
    first, second = toy_files(toy_folder)[:2]

    def posted(path: Path) -> dict:
        return httpx.post(f"{url}/classify", files={"image": (path.name, path.read_bytes(), "image/jpeg")}).json()

    def close(a: dict, b: dict) -> bool:
        return a["label"] == b["label"] and all(abs(a["probabilities"][k] - b["probabilities"][k]) <= 1e-6
                                                for k in model.classes)

    with bentoml.SyncHTTPClient(url) as client:
        assert {"classify", "classify_batch", "explain", "model", "ui"} <= set(client.endpoints)
        assert close(client.classify(image=first), posted(first))
        batch = client.classify_batch(images=[first, second])["results"]
        assert close(batch[0], posted(first)) and close(batch[1], posted(second))
        assert client.model()["classes"] == model.classes
        explained = client.explain(image=first, target="dog")
        assert explained["saliency"]["class"] == "dog" and close(explained, posted(first))

    async def call_async() -> dict:
        async with bentoml.AsyncHTTPClient(url) as client:
            return await client.classify(image=second)

    assert close(asyncio.run(call_async()), posted(second))
    # One description per route, from the one table: BentoML's schema and its OpenAPI document.
    routes = {r["name"]: r for r in httpx.get(f"{url}/schema.json").json()["routes"]}
    assert routes["classify"]["route"] == "/classify" and routes["classify"]["input"]["properties"]["image"]["type"] == "file"
    docs = httpx.get(f"{url}/docs.json").json()["paths"]
    assert {"/classify", "/classify_batch", "/explain", "/model", "/ui"} <= set(docs)
    assert "multipart/form-data" in docs["/classify"]["post"]["requestBody"]["content"]


def test_classify_command_prints_a_table(served, toy_folder, capsys):
    url, _, _ = served
    files = [str(p) for p in toy_files(toy_folder)[:2]]
    assert main(["classify", "--url", url, *files]) == 0
    out = capsys.readouterr().out
    assert "bird" in out and "probability" in out


def test_service_refuses_a_tampered_model(served):
    _, _, project = served
    env = {**os.environ, "BENTOML_HOME": str(project / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    store = project / "bentoml" / "models" / "cifar4-classifier"
    # The version `latest` points at: other tests may have packaged more than one.
    onnx_file = store / (store / "latest").read_text().strip() / "model.onnx"
    original = onnx_file.read_bytes()
    try:
        onnx_file.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        result = subprocess.run(
            [sys.executable, "-c", "import service.service as s; s.ImageClassifier.inner()"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
    finally:
        onnx_file.write_bytes(original)
    assert result.returncode != 0
    assert "model.onnx does not match the checksum" in result.stderr and "run `make package` again" in result.stderr


def test_no_packaged_model_is_a_clear_startup_error(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "empty"), "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run(
        [sys.executable, "-c", "import service.service as s; s.ImageClassifier.inner()"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "run `make package` first" in result.stderr


def test_predict_writes_the_probabilities_classify_serves(served, toy_folder, tmp_path):
    """`pipeline predict` (offline, no torch) and `/classify` agree to 1e-6; a broken file gets an error row."""
    import csv
    import shutil

    url, _, project = served
    folder = tmp_path / "unlabeled"
    (folder / "nested").mkdir(parents=True)
    files = toy_files(toy_folder)
    for i, path in enumerate(files):
        shutil.copy(path, (folder / "nested" if i % 2 else folder) / f"{i}_{path.name}")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    env = {**os.environ, "PIPELINE_HOME": str(project)}
    env.pop("MLFLOW_TRACKING_URI", None)
    blocker = "import sys, runpy; sys.modules['torch'] = None; sys.argv[0] = 'pipeline'; "
    result = subprocess.run(
        [sys.executable, "-c", blocker + "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))",
         "predict", str(folder), "--out", str(tmp_path / "out.csv")],
        cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 of 9 images classified" in result.stdout and "1 could not be read" in result.stdout
    with open(tmp_path / "out.csv", newline="") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    assert len(rows) == 9 and rows["broken.jpg"]["label"] == "" and "broken.jpg" in rows["broken.jpg"]["error"]
    for name, row in rows.items():
        if name == "broken.jpg":
            continue
        served_answer = httpx.post(f"{url}/classify", files={"image": ("x", (folder / name).read_bytes())}).json()
        assert row["label"] == served_answer["label"] and row["error"] == ""
        for label, probability in served_answer["probabilities"].items():
            assert abs(float(row[label]) - probability) <= 1e-6, (name, label)
        assert row["out_of_scope"] == str(served_answer["out_of_scope"]).lower()
        assert abs(float(row["out_of_scope_score"]) - served_answer["out_of_scope_score"]) <= 1e-5
    # MLflow 3's logged-model URI, as `pipeline evaluate` takes it, gives the same file.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    logged = client.get_run(client.get_model_version_by_alias("cifar4-classifier", "champion").run_id).data.tags["model_uri"]
    assert logged.startswith("models:/m-")
    result = subprocess.run(
        [sys.executable, "-c", blocker + "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))",
         "predict", str(folder), "--model", logged, "--out", str(tmp_path / "by_id.csv")],
        cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "by_id.csv").read_text() == (tmp_path / "out.csv").read_text()
