"""The serving side needs no torch: the runtime package imports without it, and so does packaging."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime.settings import Settings, SettingsError

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; "


def test_runtime_imports_with_torch_blocked():
    code = BLOCK_TORCH + ("import pipeline.runtime, pipeline.runtime.imaging, pipeline.runtime.onnx_model, "
                          "pipeline.runtime.explainer, pipeline.runtime.pictures, pipeline.runtime.routes, "
                          "pipeline.runtime.bodies, pipeline.runtime.batching, pipeline.runtime.deadline, "
                          "pipeline.runtime.follower, pipeline.runtime.model_folder, pipeline.runtime.settings; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.slow
def test_packaging_a_new_run_imports_no_torch(served):
    _, _, project = served
    env = {**os.environ, "PIPELINE_HOME": str(project), "BENTOML_HOME": str(project / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    code = BLOCK_TORCH + "from pipeline.cli import main; raise SystemExit(main(['package', '--no-build']))"
    result = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cifar4-classifier:" in result.stdout and "BentoML" in result.stdout


def test_settings_refuse_bad_values_in_one_sentence():
    assert Settings.from_env({}).max_body_bytes == 10 * 1024 * 1024
    assert Settings.from_env({"CLASSIFIER_WORKERS": "", "CLASSIFIER_ACCESS_LOG": "yes"}).access_log is True
    for environ, words in [({"CLASSIFIER_WORKERS": "two"}, "CLASSIFIER_WORKERS='two' must be a whole number"),
                           ({"CLASSIFIER_READ_TIMEOUT_S": "-1"}, "must be above 0"),
                           ({"CLASSIFIER_ACCESS_LOG": "maybe"}, "must be 1/true/yes or 0/false/no"),
                           ({"CLASSIFIER_MAX_BODY_BYTE": "5"}, "Unknown setting CLASSIFIER_MAX_BODY_BYTE")]:
        with pytest.raises(SettingsError, match=words):
            Settings.from_env(environ)


def test_batcher_runs_a_lone_request_inline_and_batches_concurrent_ones():
    import asyncio
    import threading

    import numpy as np

    from pipeline.runtime.batching import MicroBatcher

    calls: list[tuple[int, str]] = []

    def predict(images: np.ndarray) -> np.ndarray:
        calls.append((len(images), threading.current_thread().name))
        return images[:, :1, 0, 0].astype(np.float32)  # each row answers with its own first pixel

    async def scenario() -> tuple[list, list]:
        batcher = MicroBatcher(predict, max_batch=16)
        lone, _ = await batcher.submit(np.full((1, 3, 2, 2), 7, np.uint8))
        together = await asyncio.gather(*[batcher.submit(np.full((1, 3, 2, 2), i, np.uint8)) for i in range(8)])
        return lone, [rows for rows, _ in together]

    lone, together = asyncio.run(scenario())
    assert lone.tolist() == [[7.0]]
    assert [rows.tolist() for rows in together] == [[[float(i)]] for i in range(8)]  # each request gets its row
    assert calls[0] == (1, threading.main_thread().name)        # alone: on the event loop, no thread hop
    assert calls[1][0] == 8 and calls[1][1].startswith("model")  # concurrent: one call on the model thread
    assert len(calls) == 2


def _form_request(content_type: str, body: bytes):
    from starlette.requests import Request

    return Request({"type": "http", "method": "POST", "path": "/classify", "query_string": b"",
                    "headers": [(b"content-type", content_type.encode())]})


def _uploads(content_type: str, body: bytes, field: str = "images"):
    import asyncio

    from pipeline.runtime.bodies import Limits, RequestError, parse_uploads

    try:
        return [(u.name, u.data) for u in asyncio.run(parse_uploads(_form_request(content_type, body), body, field,
                                                                   Limits(max_batch_files=4)))]
    except RequestError as error:
        return f"{error.status} {error.message}"


def test_plain_multipart_bodies_parse_as_starlette_parses_them(monkeypatch):
    """httpx's and requests' bodies take the one-pass split; the answers equal Starlette's parser's,
    and bodies written any other way (padding after a delimiter, other parameter orders) still parse through Starlette."""
    import httpx

    from pipeline.runtime import bodies as http

    forms = [{"images": ("a b.jpg", b"\xff\xd8one", "image/jpeg")},
             [("images", ("1.jpg", b"first")), ("images", ("dir/2.png", b"")), ("note", (None, b"text"))],
             {"image": ("x.jpg", b"data")},  # the wrong field: the error lists the fields found
             [("images", (None, b"just text"))],
             [("images", ("%d.jpg" % i, b"x")) for i in range(6)]]  # more parts than the plain split takes
    bodies = []
    for files in forms:
        request = httpx.Request("POST", "http://127.0.0.1/classify", files=files)
        bodies.append((request.headers["content-type"], request.read()))
    boundary = "b0undary"
    odd = (b"--b0undary\r\nContent-Disposition: form-data; name=\"images\"; filename=\"q.jpg\"\r\n\r\n"
           b"odd\r\n--b0undary  \r\nContent-Disposition: form-data; filename=\"r.jpg\"; name=\"images\"\r\n"
           b"\r\nmore\r\n--b0undary--\r\n")
    bodies.append((f'multipart/form-data; boundary="{boundary}"', odd))
    split = [http.split_plain_multipart(ct, body, 5) is not None for ct, body in bodies]
    assert split == [True, True, True, True, False, False]
    fast = [_uploads(ct, body) for ct, body in bodies]
    monkeypatch.setattr(http, "split_plain_multipart", lambda *args: None)  # Starlette's parser for every body
    assert fast == [_uploads(ct, body) for ct, body in bodies]
    assert fast[0] == [("a b.jpg", b"\xff\xd8one")] and fast[1] == [("1.jpg", b"first"), ("2.png", b"")]
    assert fast[2] == "400 The form has no file field 'images' (fields found: 'image')."
    assert fast[3].startswith("400 Form field 'images' must be a file upload")
    assert fast[5] == [("q.jpg", b"odd"), ("r.jpg", b"more")]


def _deadline_call(app, timeout: float) -> list[dict]:
    import asyncio

    from pipeline.runtime.deadline import FirstByteDeadline

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(FirstByteDeadline(app, timeout)({"type": "http", "path": "/", "headers": []}, receive, send))
    return sent


def test_a_request_with_no_answer_by_the_deadline_gets_a_504_and_its_work_is_cancelled():
    import asyncio
    import json

    cancelled = []

    async def stuck(scope, receive, send):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    sent = _deadline_call(stuck, 0.05)
    assert sent[0]["status"] == 504 and cancelled == [True]
    assert "No answer within 0.05 s" in json.loads(sent[1]["body"])["error"]

    async def slow_stream(scope, receive, send):  # started in time, finishes after the deadline: not cut
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.1)
        await send({"type": "http.response.body", "body": b"done"})

    assert [m.get("status", m.get("body")) for m in _deadline_call(slow_stream, 0.05)] == [200, b"done"]


def test_the_deadline_leaves_no_timer_behind_and_replaces_bentomls():
    """BentoML's TimeoutMiddleware kept a 60 s timer alive per request; the deadline cancels its own."""
    import asyncio
    import gc

    from pipeline.runtime.deadline import FirstByteDeadline

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def many():
        middleware = FirstByteDeadline(ok, 60)
        for _ in range(200):
            await middleware({"type": "http", "path": "/", "headers": []}, None, lambda m: asyncio.sleep(0))
        return sum(isinstance(o, asyncio.TimerHandle) and not o.cancelled() for o in gc.get_objects())

    assert asyncio.run(many()) == 0
    code = ("import types, service.service; from bentoml._internal.server.base_app import BaseAppFactory; "
            "stack = BaseAppFactory.middlewares.fget(types.SimpleNamespace(timeout=60, max_concurrency=None)); "
            "print([m.cls.__name__ for m in stack])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"})
    assert result.stdout.strip() == "['FirstByteDeadline']", result.stderr[-2000:]
