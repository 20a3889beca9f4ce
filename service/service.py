"""BentoML service: the champion classifier behind POST /classify, /classify_batch and /explain,
and the /ui page.

The routes are one table (``ROUTES``) served by a small ASGI router (``pipeline.runtime.routes``)
mounted on the BentoML service: every route takes the same short path and every error is
``{"error": ...}`` JSON. The same table is published in BentoML's ``/schema.json`` and ``/docs.json``
(:func:`publish_routes`), so BentoML's clients call every route by name and its page at ``/`` lists
them. BentoML keeps /readyz, /livez and /metrics. To add a route, add a line to ``ROUTES`` and a
method of that name to ``ImageClassifier``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import numpy as np

# The bento ships src/pipeline/runtime/ (everything the service runs, no torch) beside this folder.
_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from pipeline.runtime.batching import MicroBatcher  # noqa: E402
from pipeline.runtime.bodies import RequestError, parse_uploads, read_body  # noqa: E402
from pipeline.runtime.deadline import FirstByteDeadline  # noqa: E402
from pipeline.runtime.follower import Follower, Refused, RegistryUnreachable  # noqa: E402
from pipeline.runtime.imaging import ImageDecodeError, decode_image  # noqa: E402
from pipeline.runtime.loader import Served, load_served  # noqa: E402
from pipeline.runtime.model_folder import ModelError  # noqa: E402
from pipeline.runtime.routes import FILE, Field, Route, Router, json_response  # noqa: E402
from pipeline.runtime.settings import Settings  # noqa: E402

SETTINGS = Settings.from_env()
UI_PAGE = Path(__file__).resolve().parent / "ui" / "index.html"
INLINE_DECODE_BYTES = 256 * 1024  # smaller uploads decode on the event loop: a thread hop costs more

PROBABILITIES = {"type": "object", "additionalProperties": {"type": "number"},
                 "description": "class -> calibrated probability; they sum to 1"}
ANSWER = {"type": "object", "required": ["label", "probabilities", "out_of_scope", "out_of_scope_score", "model"],
          "properties": {
              "label": {"type": "string", "description": "the most probable class"},
              "probabilities": PROBABILITIES,
              "out_of_scope": {"type": ["boolean", "null"],
                               "description": "true: the image looks like none of the classes (null: the model "
                                              "has no out-of-scope score)"},
              "out_of_scope_score": {"type": ["number", "null"], "description": "higher: further from the "
                                     "training images; flagged over the threshold stored with the model"},
              "model": {"type": "object", "description": "name, version and run of the model that answered"}}}
IMAGE = Field("image", FILE, "JPEG, PNG, WebP, BMP or GIF (the raw image as the body with an image/* content "
                             "type works too)")
ROUTES = [
    Route("POST", "/classify", "classify", "Calibrated probabilities for one image, and whether it looks like "
          "none of the classes.", name="classify", fields=(IMAGE,), output=ANSWER),
    Route("POST", "/classify_batch", "classify_batch", "Answers for several images, in order.",
          name="classify_batch", fields=(Field("images", {"type": "array", "items": FILE}, "the images"),),
          output={"type": "object", "properties": {"results": {"type": "array", "items": ANSWER}}}),
    Route("POST", "/explain", "explain", "What the network sees: /classify's answer plus feature maps, "
          "first-layer filters and responses, hand-made kernels and Grad-CAM (PNG, base64).", name="explain",
          fields=(IMAGE, Field("target", {"type": "string"}, "the class whose Grad-CAM to draw (default: the "
                               "predicted one; also ?target=CLASS)", required=False)),
          output={"type": "object", "description": "the /classify answer plus the pictures"}),
    Route("GET", "/model", "describe", "The served model's metadata: classes, normalization, calibration "
          "temperature, out-of-scope threshold, origin, batch counters, and with CLASSIFIER_FOLLOW the registry "
          "status.", name="model"),
    Route("GET", "/ui", "ui", "A page to drop an image on and see what the network sees.", name="ui",
          output={"type": "string"}, media_type="text/html"),
]
app = Router(ROUTES, title="Image classifier")


# With CLASSIFIER_FOLLOW: alias moves taken and refused, on /metrics (summed over the workers).
FOLLOW_EVENTS = bentoml.metrics.Counter(
    name="classifier_model_follow_events", documentation="Registry alias moves: swapped in, or refused",
    labelnames=["event"])
# What users send, as the answers see it: a shift in incoming images shows as a shift in these.
ANSWERS = bentoml.metrics.Counter(
    name="classifier_answers", documentation="Answers by predicted label and out-of-scope flag",
    labelnames=["label", "out_of_scope"])
TOP_PROBABILITY = bentoml.metrics.Histogram(
    name="classifier_top_probability", documentation="The answer's highest (calibrated) probability",
    buckets=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0))


# BentoML builds each worker's middleware stack after importing this module, taking its
# TimeoutMiddleware from this module attribute: ours keeps the rule (504 when no answer has started
# within traffic.timeout) without a live timer per request for 60 s (see FirstByteDeadline).
# A BentoML without that module keeps its own timeout handling; the service still starts.
try:
    from bentoml._internal.server.http import traffic as bentoml_traffic

    bentoml_traffic.TimeoutMiddleware = FirstByteDeadline
except ImportError:
    print("This BentoML has no _internal.server.http.traffic: its own timeout handling stays "
          "(see FirstByteDeadline for what that cost in 1.4).", file=sys.stderr)


# The model routes are hot: OpenTelemetry spans cost ~0.1 ms a request and nothing exports them
# unless tracing is configured. CLASSIFIER_TRACE_ROUTES=1 keeps them.
TRACING = {} if SETTINGS.trace_routes else {
    "excluded_urls": ",".join(r.path for r in ROUTES if r.method == "POST")}


# One event loop per core, up to two: on 2 cores, 2 workers with 1 ONNX Runtime thread each served
# ~1.4x the requests of 1 worker with 2 threads (bench/serve_load.py). The model does not get
# cheaper per image in batches on a CPU, so the gain is in running the HTTP side on both cores.
@bentoml.service(name="cifar4_classifier", workers=SETTINGS.worker_count, traffic={"timeout": 60},
                 logging={"access": {"enabled": SETTINGS.access_log}}, tracing=TRACING)
@bentoml.asgi_app(app, path="/")
class ImageClassifier:
    model_ref = bentoml.models.BentoModel(SETTINGS.model)

    def __init__(self) -> None:
        self.follower = None
        self.served = self._follow() if SETTINGS.follow else None
        if self.served is None:
            self.served = self._packaged()
        self.explain_pool = ThreadPoolExecutor(1, "explain")
        self.decoder = ThreadPoolExecutor(2, "decode")
        # Batches of up to 16 images: a bigger batch is no cheaper per image on a CPU (the model is compute
        # bound, TTA views included), and ONNX Runtime's arena grows with it (64: 942 MB RSS under load).
        # Each call takes self.served once: a model swapped in by the follower never mixes into a batch,
        # and every answer names the version that computed it.
        batch = SETTINGS.model_batch

        def predict(images: np.ndarray):
            """One (N, classes + 1) array: the probabilities, then the out-of-scope score (NaN without one)."""
            served = self.served
            probabilities, scores = served.model.predict(images, chunk=batch)
            column = np.full(len(images), np.nan, np.float32) if scores is None else scores.astype(np.float32)
            return np.column_stack([probabilities, column]), served

        self.batcher = MicroBatcher(predict, max_batch=batch)
        app.bind(self)
        if self.follower is not None:
            self.follower.start()
        # Everything loaded so far (BentoML, ONNX Runtime, numpy: ~10^5 objects) lives as long as the
        # worker. Freezing it keeps the cyclic GC from walking it in the full collections that stall
        # the event loop under load (tail latency; see README "How it spreads load").
        gc.collect()
        gc.freeze()

    def _packaged(self) -> Served:
        try:
            stored = self.model_ref
        except bentoml.exceptions.BentoMLException as error:
            raise RuntimeError(
                f"No packaged model {SETTINGS.model!r} in the BentoML store "
                f"({os.environ.get('BENTOML_HOME', '~/bentoml')}): run `make package` first."
            ) from error
        info = dict(stored.info.metadata)
        try:
            return load_served(Path(stored.path), info.get("checksums", {}), info, SETTINGS.thread_count,
                               SETTINGS.ort_spinning)
        except ModelError as error:
            raise ModelError(f"Packaged model {SETTINGS.model} at {stored.path}: {error}; run `make package` "
                             "again.") from None

    def _follow(self) -> Served | None:
        """CLASSIFIER_FOLLOW: start from the alias's model; the packaged one when MLflow cannot give it."""
        def swap(served: Served) -> None:
            self.served = served  # one assignment: the next model call takes it

        self.follower = Follower(SETTINGS.follow, os.environ["MLFLOW_TRACKING_URI"], SETTINGS.follow_interval_s,
                                 swap, threads=SETTINGS.thread_count, spinning=SETTINGS.ort_spinning,
                                 on_event=lambda kind: FOLLOW_EVENTS.labels(event=kind).inc())
        try:
            return self.follower.initial()
        except (RegistryUnreachable, Refused) as error:
            self.follower.reachable = not isinstance(error, RegistryUnreachable)
            self.follower.last_error = str(error)
            try:
                served = self._packaged()
            except RuntimeError:
                raise RuntimeError(f"CLASSIFIER_FOLLOW={SETTINGS.follow}: {error} No packaged model to serve "
                                   "meanwhile: run `make package`, or start when MLflow answers.") from None
            self.follower.current = served
            print(f"CLASSIFIER_FOLLOW={SETTINGS.follow}: {error} Serving the packaged model (version "
                  f"{served.info.get('model_version')}) until the alias can be followed.", file=sys.stderr)
            return served

    def _decode(self, upload) -> np.ndarray:
        return decode_image(upload.data, self.served.model.image_size, SETTINGS.max_pixels, name=upload.name)

    async def _read_images(self, request, many: bool, text: dict | None = None) -> list[np.ndarray]:
        body = await read_body(request, SETTINGS)
        uploads = await parse_uploads(request, body, "images" if many else "image", SETTINGS, text)
        if len(uploads) > (SETTINGS.max_batch_files if many else 1):
            allowed = SETTINGS.max_batch_files if many else 1
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

    @staticmethod
    def _answer(row: np.ndarray, served: Served) -> dict:
        """``row``: the class probabilities, then the out-of-scope score (see ``predict``)."""
        model = served.model
        row, score = row[:-1], row[-1]
        label = model.classes[int(row.argmax())]
        flagged = bool(score > model.scope_threshold) if model.has_scope else None
        ANSWERS.labels(label=label, out_of_scope=str(flagged).lower()).inc()
        TOP_PROBABILITY.observe(float(row.max()))
        return {"label": label, "probabilities": {name: float(p) for name, p in zip(model.classes, row)},
                "out_of_scope": flagged, "out_of_scope_score": float(score) if model.has_scope else None,
                "model": served.answer_info}

    async def classify(self, request):
        (array,) = await self._read_images(request, many=False)
        rows, served = await self.batcher.submit(array[None])
        return json_response(self._answer(rows[0], served))

    async def classify_batch(self, request):
        arrays = await self._read_images(request, many=True)
        rows, served = await self.batcher.submit(np.stack(arrays))
        return json_response({"results": [self._answer(row, served) for row in rows]})

    async def explain(self, request):
        if self.served.explainer is None:
            raise RequestError(f"Model version {self.served.info.get('model_version')} has no explain graph: "
                               "run `make package` again.", 503)
        fields: dict[str, str] = {}
        (array,) = await self._read_images(request, many=False, text=fields)
        target = request.query_params.get("target") or fields.get("target") or None
        if target and target.startswith('"'):  # BentoML's clients send text fields as JSON
            try:
                target = json.loads(target)
            except ValueError:
                pass
        classes = self.served.model.classes
        if target is not None and target not in classes:
            raise RequestError(f"Unknown target class {target!r}: choose one of {', '.join(classes)}.")
        # The probabilities come from the same model and batcher as /classify, so they are identical;
        # the pictures come from the explain graph of the model that computed them.
        rows, served = await self.batcher.submit(array[None])
        answer = self._answer(rows[0], served)
        index = served.model.classes.index(target) if target else served.model.classes.index(answer["label"])
        if served.explainer is None:
            raise RequestError(f"Model version {served.info.get('model_version')} has no explain graph.", 503)
        loop = asyncio.get_running_loop()
        answer.update(await loop.run_in_executor(self.explain_pool, served.explainer.explain, array, index))
        return json_response(answer)

    async def describe(self, request):
        answer = {**self.served.info, "batches": self.batcher.batches, "items": self.batcher.items}
        if self.follower is not None:
            answer["follow"] = self.follower.status()
        return json_response(answer)

    async def ui(self, request):
        from starlette.responses import HTMLResponse

        return HTMLResponse(UI_PAGE.read_text(encoding="utf-8"))


def publish_routes(service, router: Router) -> None:
    """BentoML's ``/schema.json`` (which its clients read to build their methods) and ``/docs.json`` (behind
    its page at ``/``) describe only ``@bentoml.api`` methods. The routes are served by the router for
    speed, so they are added to both from the same table: ``bentoml.SyncHTTPClient(url).classify(image=path)``
    then works, and the page at ``/`` lists every route. Dispatch does not change."""
    import attr
    from bentoml._internal.service.openapi.specification import PathItem
    from bentoml._internal.utils.cattr import bentoml_cattr

    base = type(service)

    class PublishedService(base):
        __slots__ = ()

        def schema(self) -> dict:
            schema = base.schema(self)
            return {**schema, "routes": router.bentoml_routes() + list(schema.get("routes", []))}

        @property
        def openapi_spec(self):
            spec = base.openapi_spec.fget(self)
            paths = {path: bentoml_cattr.structure(item, PathItem) for path, item in router.openapi_paths().items()}
            return attr.evolve(spec, paths={**spec.paths, **paths})

    service.__class__ = PublishedService


publish_routes(ImageClassifier, app)
