"""BentoML service: the champion classifier behind POST /classify, /classify_batch and /explain,
and the /ui page.

Routes are a FastAPI app mounted on the BentoML service, so that every bad request
(malformed multipart, raw bodies, oversize uploads) gets a JSON error this code chose;
BentoML keeps /readyz, /livez, /metrics and its OpenAPI page at /.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

# The bento ships src/pipeline/{imaging,predictor,serving,explainer,visual}.py beside this folder.
_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from pipeline.explainer import EXPLAIN_JSON, EXPLAIN_ONNX, Explainer  # noqa: E402
from pipeline.imaging import ImageDecodeError, decode_image  # noqa: E402
from pipeline.predictor import METADATA_FILE, ONNX_FILE, ModelError, OnnxClassifier  # noqa: E402
from pipeline.serving import Limits, MicroBatcher, RequestError, parse_uploads, read_body  # noqa: E402

MODEL_TAG = os.environ.get("CLASSIFIER_MODEL", "cifar4-classifier:latest")
# One event loop per core, up to two: on 2 cores, 2 workers with 1 ONNX Runtime thread each served
# ~1.4x the requests of 1 worker with 2 threads (bench/serve_load.py). The model does not get
# cheaper per image in batches on a CPU, so the gain is in running the HTTP side on both cores.
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _env_int(name: str) -> int:
    """A positive integer setting, or 0 when unset or empty (compose passes empty values)."""
    value = os.environ.get(name, "").strip()
    if value and (not value.isdigit() or int(value) < 1):
        raise RuntimeError(f"{name}={value!r} must be a positive whole number.")
    return int(value or 0)


WORKERS = _env_int("CLASSIFIER_WORKERS") or min(2, _CPUS)
THREADS = _env_int("CLASSIFIER_THREADS") or max(1, min(4, _CPUS // WORKERS))
# Idle ONNX Runtime threads spin by default; here they would take CPU from the event loops.
ORT_SPINNING = os.environ.get("CLASSIFIER_ORT_SPINNING", "0").lower() in ("1", "true", "yes")
UI_PAGE = Path(__file__).resolve().parent / "ui" / "index.html"


def file_checksums(folder: Path, names) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in names if (folder / name).is_file()}


def load_packaged_model(folder: Path, expected: dict[str, str]) -> OnnxClassifier:
    """Refuse a model whose files changed since `make package`, or whose classes do not fit it."""
    for name in (ONNX_FILE, METADATA_FILE):
        if not (folder / name).is_file():
            raise ModelError(f"Packaged model {MODEL_TAG} at {folder} lacks {name}: run `make package` again.")
    actual = file_checksums(folder, expected)
    for name, digest in expected.items():
        if actual.get(name) != digest:
            raise ModelError(f"Checksum of {name} in {folder} does not match the one recorded at packaging: "
                             "the model files were modified; run `make package` again.")
    return OnnxClassifier.from_dir(folder, threads=THREADS, spinning=ORT_SPINNING)


# Access logs cost about a millisecond a request on 2 cores: off unless CLASSIFIER_ACCESS_LOG=1.
ACCESS_LOG = os.environ.get("CLASSIFIER_ACCESS_LOG", "0").lower() in ("1", "true", "yes")
INLINE_DECODE_BYTES = 256 * 1024  # smaller uploads decode on the event loop: a thread hop costs more


# The classifier routes are hot: OpenTelemetry spans for them cost ~0.1 ms a request and
# nothing exports them unless tracing is configured. CLASSIFIER_TRACE_ROUTES=1 keeps them.
HOT_ROUTES = ("/classify", "/classify_batch", "/explain")
TRACING = {} if os.environ.get("CLASSIFIER_TRACE_ROUTES", "0").lower() in ("1", "true", "yes") else {
    "excluded_urls": ",".join(HOT_ROUTES)}
SERVICE: "ImageClassifier | None" = None  # the instance BentoML made in this worker


def route_path(scope) -> str:
    """The path below the mount point (Starlette keeps the full path in scope["path"])."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


class ClassifierApp(FastAPI):
    """FastAPI that answers the hot POST routes itself, before its middleware and router:
    they need neither, and skipping them saves a good part of each request on 2 cores.
    FastAPI still serves the other routes (/model, /ui, /api/docs) and documents all of them."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and SERVICE is not None:
            handler = SERVICE.hot_routes.get(route_path(scope))
            if handler is not None:
                response = await handler(Request(scope, receive))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


app = ClassifierApp(title="Image classifier", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)


@bentoml.service(name="cifar4_classifier", workers=WORKERS, traffic={"timeout": 60},
                 logging={"access": {"enabled": ACCESS_LOG}}, tracing=TRACING)
@bentoml.asgi_app(app, path="/")
class ImageClassifier:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        try:
            stored = self.model_ref
        except bentoml.exceptions.BentoMLException as error:
            raise RuntimeError(
                f"No packaged model {MODEL_TAG!r} in the BentoML store ({os.environ.get('BENTOML_HOME', '~/bentoml')}): "
                "run `make package` first."
            ) from error
        self.info = dict(stored.info.metadata)
        self.model = load_packaged_model(Path(stored.path), self.info.get("checksums", {}))
        # Models packaged before /explain existed have no explain graph: /explain then says so.
        self.explainer = None
        if (Path(stored.path) / EXPLAIN_ONNX).is_file() and EXPLAIN_JSON in self.info.get("checksums", {}):
            self.explainer = Explainer(stored.path, self.model.classes, threads=THREADS)
        self.explain_pool = ThreadPoolExecutor(1, "explain")
        self.limits = Limits.from_env()
        self.decoder = ThreadPoolExecutor(2, "decode")
        self.batcher = MicroBatcher(self.model.predict_proba, max_batch=64)
        self.model_info = {
            "name": self.info.get("registered_model"), "version": self.info.get("model_version"),
            "run_id": self.info.get("run_id"),
        }
        self.hot_routes = {"/classify": self.classify, "/classify_batch": self.classify_batch, "/explain": self.explain}
        global SERVICE
        SERVICE = self

    def _decode(self, upload) -> np.ndarray:
        return decode_image(upload.data, self.model.image_size, self.limits.max_pixels, name=upload.name)

    async def _classify(self, request: Request, many: bool) -> list[dict]:
        arrays = await self._read_images(request, many)
        probabilities = await self.batcher.submit(np.stack(arrays))
        return [self._answer(row) for row in probabilities]

    async def _read_images(self, request: Request, many: bool) -> list[np.ndarray]:
        body = await read_body(request, self.limits.max_body_bytes, self.limits.read_timeout_s)
        uploads = await parse_uploads(request, body, "images" if many else "image", self.limits)
        if len(uploads) > (self.limits.max_batch_files if many else 1):
            allowed = self.limits.max_batch_files if many else 1
            raise RequestError(f"{len(uploads)} files sent; at most {allowed} allowed in one request.",
                               413 if many else 400)
        loop = asyncio.get_running_loop()
        try:
            if sum(len(u.data) for u in uploads) <= INLINE_DECODE_BYTES:
                arrays = [self._decode(u) for u in uploads]
            else:
                arrays = await asyncio.gather(*[loop.run_in_executor(self.decoder, self._decode, u) for u in uploads])
        except ImageDecodeError as error:
            raise RequestError(str(error)) from None
        return arrays

    async def _explain(self, request: Request) -> list[dict]:
        target = request.query_params.get("target")
        if target is not None and target not in self.model.classes:
            raise RequestError(f"Unknown target class {target!r}: choose one of {', '.join(self.model.classes)}.")
        if self.explainer is None:
            raise RequestError(f"Packaged model {MODEL_TAG} has no explain graph: run `make package` again.", 503)
        (array,) = await self._read_images(request, many=False)
        # The probabilities come from the same model and batcher as /classify, so they are identical.
        row = (await self.batcher.submit(array[None]))[0]
        answer = self._answer(row)
        index = self.model.classes.index(target) if target else int(row.argmax())
        loop = asyncio.get_running_loop()
        answer.update(await loop.run_in_executor(self.explain_pool, self.explainer.explain, array, index))
        return [answer]

    def _answer(self, row: np.ndarray) -> dict:
        probabilities = {name: float(p) for name, p in zip(self.model.classes, row)}
        return {"label": self.model.classes[int(row.argmax())], "probabilities": probabilities,
                "model": self.model_info}

    async def classify(self, request: Request) -> JSONResponse:
        return await respond(self._classify(request, many=False), single=True)

    async def classify_batch(self, request: Request) -> JSONResponse:
        return await respond(self._classify(request, many=True), single=False)

    async def explain(self, request: Request) -> JSONResponse:
        return await respond(self._explain(request), single=True)

    def describe(self) -> dict:
        return {**self.info, "batches": self.batcher.batches, "items": self.batcher.items}


# FastAPI documents every route at /api/docs and serves the cold ones. ClassifierApp answers the hot
# POST routes before FastAPI's router; these functions are the same handlers for any other caller.
def _service() -> ImageClassifier:
    if SERVICE is None:
        raise RuntimeError("The classifier service is not started.")
    return SERVICE


@app.post("/classify")
async def classify(request: Request):
    """One image as multipart field `image`, or as the raw body with an image/* content type."""
    return await _service().classify(request)


@app.post("/classify_batch")
async def classify_batch(request: Request):
    """Several images as repeated multipart fields `images`; answers keep their order."""
    return await _service().classify_batch(request)


@app.post("/explain")
async def explain(request: Request):
    """Like /classify, plus feature maps per stage, first-layer filters and their responses, hand-made
    kernels applied to the image and a Grad-CAM overlay (PNGs in base64). `?target=CLASS` picks
    the Grad-CAM class (default: the predicted one)."""
    return await _service().explain(request)


@app.get("/ui", response_class=HTMLResponse)
def ui() -> HTMLResponse:
    """A page to drop an image on and see what the network sees."""
    return HTMLResponse(UI_PAGE.read_text(encoding="utf-8"))


@app.get("/model")
def model() -> dict:
    """The packaged model's metadata: classes, normalization, input size, architecture, MLflow origin."""
    return _service().describe()


async def respond(work, single: bool) -> JSONResponse:
    started = time.perf_counter()
    try:
        answers = await work
    except RequestError as error:
        return JSONResponse({"error": error.message}, status_code=error.status)
    headers = {"X-Inference-Ms": f"{(time.perf_counter() - started) * 1000:.2f}"}
    return JSONResponse(answers[0] if single else {"results": answers}, headers=headers)
