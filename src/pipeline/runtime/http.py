"""HTTP plumbing for the classifier service: the route table, JSON errors, bounded bodies,
multipart parsing and micro-batching.

Kept free of BentoML and torch so it is small, testable and fast to import.

Routing is one table of :class:`Route` s served by :class:`Router`, a small ASGI app: every
route gets the same short path (no middleware stack), the OpenAPI document and the
``/api/docs`` page are made from the same table, and anything the table does not match gets
``{"error": ...}`` with 404, 405 (and an ``Allow`` header) or 431.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

import numpy as np

from pipeline.runtime.settings import Settings

log = logging.getLogger("pipeline.runtime")
MAX_HEADER_BYTES = 16 * 1024  # all request headers together; more is a 431
MAX_HEADERS = 100


class RequestError(Exception):
    """A client mistake: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


@dataclass
class Limits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_batch_files: int = 128
    read_timeout_s: float = 30.0
    drain_bytes: int = 64 * 1024 * 1024
    drain_timeout_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "Limits":
        return cls(settings.max_body_bytes, settings.max_pixels, settings.max_batch_files, settings.read_timeout_s,
                   settings.drain_bytes, settings.drain_timeout_s)


@dataclass
class Upload:
    name: str
    data: bytes


async def _within(seconds: float, work: Awaitable) -> Any:
    if hasattr(asyncio, "timeout"):  # Python 3.11+: no extra task per request
        async with asyncio.timeout(seconds):
            return await work
    return await asyncio.wait_for(work, seconds)


async def drain(receive, limit: int, seconds: float) -> None:
    """Read and drop the rest of a refused body (up to ``limit`` bytes and ``seconds``), so that the 413
    reaches a client that sends its whole body first (``Connection: close``, HTTP/1.0): closing on
    unread data would reset the connection before it reads the answer."""

    async def drop() -> None:
        dropped = 0
        while dropped <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    try:
        await _within(seconds, drop())
    except asyncio.TimeoutError:
        pass


async def read_body(request, limits: Limits) -> bytes:
    """The whole body, refusing (413) anything over the limit before and while reading it.

    A client that sent ``Expect: 100-continue`` gets the 413 before it sends the body: nothing
    was read, so the server never said "100 Continue". Other clients' bodies are drained first.
    """
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    expects_continue = request.headers.get("expect", "").lower() == "100-continue"
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(f"Content-Length {declared!r} is not a number.")
        if int(declared) > limit:
            if not expects_continue:
                await drain(request.receive, limits.drain_bytes, limits.drain_timeout_s)
            raise RequestError(f"The body is {int(declared):,} bytes, over the limit of {limit:,} bytes.", 413)
    chunks, size = [], 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                await drain(request.receive, limits.drain_bytes, limits.drain_timeout_s)
                raise RequestError(f"The body is over the limit of {limit:,} bytes.", 413)
            chunks.append(chunk)

    try:
        await _within(limits.read_timeout_s, collect())
    except asyncio.TimeoutError:
        raise RequestError(f"The body did not arrive within {limits.read_timeout_s:g} s.", 408) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def parse_uploads(request, body: bytes, field_name: str, limits: Limits,
                        text: Optional[dict[str, str]] = None) -> list[Upload]:
    """Images from a multipart form field ``field_name``, or the raw body when it is an image type.
    ``text``, when given, receives the form's text fields (name -> value)."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        parts = split_plain_multipart(content_type, body, limits.max_batch_files + 1)
        if parts is None:
            parts = await _parse_multipart(request, body, limits)
        uploads = []
        for name, filename, data in parts:
            if filename is None and text is not None and name != field_name:
                text[name] = data.decode("utf-8", "replace")
            if name != field_name:
                continue
            if filename is None:
                raise RequestError(f"Form field {field_name!r} must be a file upload, not text.")
            uploads.append(Upload(_safe_name(filename), data))
        if not uploads:
            found = ", ".join(dict.fromkeys(repr(name) for name, _, _ in parts)) or "none"
            raise RequestError(f"The form has no file field {field_name!r} (fields found: {found}).")
        return uploads
    if media_type.startswith("image/") or media_type == "application/octet-stream":
        if not body:
            raise RequestError("The request body is empty: send an image.")
        return [Upload("body", body)]
    shown = media_type or "none"
    raise RequestError(
        f"Unsupported content type {shown!r}: send multipart/form-data with a file field {field_name!r}, "
        "or the raw image with an image/* content type.", 415,
    )


Part = tuple[str, Optional[str], bytes]  # field name, file name (None for a text field), data
_BOUNDARY = re.compile(r";\s*boundary=(\"?)([0-9A-Za-z'()+_,\-./:=?]{1,70})\1\s*$", re.I)
_DISPOSITION = re.compile(rb'form-data; name="([\x20-\x21\x23-\x5b\x5d-\x7e]*)"'
                          rb'(?:; filename="([\x20-\x21\x23-\x5b\x5d-\x7e]*)")?', re.I)
_PART_HEADER = re.compile(rb"[!#-'*+.0-9A-Z^-z|~-]+: ?[\x20-\x7e]*")


def split_plain_multipart(content_type: str, body: bytes, max_parts: int) -> list[Part] | None:
    """The parts of a multipart body written the plain way (as browsers, curl, requests and httpx
    write it), in one pass of ``bytes.split``; ``None`` for anything else: quoted or escaped names,
    non-ASCII or folded headers, padding after a delimiter, a preamble, more than ``max_parts``
    parts. Those go to Starlette's parser, which reads every form the RFC allows but costs 35-65 us
    more per request (``bench/request_cost.py``).
    """
    match = _BOUNDARY.search(content_type)
    if match is None:
        return None
    dash = b"--" + match.group(2).encode()
    if not body.startswith(dash + b"\r\n"):
        return None
    end = body.find(b"\r\n" + dash + b"--")
    if end < 0:
        return None
    chunks = body[len(dash) + 2 : end].split(b"\r\n" + dash + b"\r\n")
    if len(chunks) > max_parts or any(dash in chunk for chunk in chunks):
        return None  # a delimiter written some other way: let the full parser decide
    parts = []
    for chunk in chunks:
        head, blank, data = chunk.partition(b"\r\n\r\n")
        if not blank:
            return None
        disposition = None
        for line in head.split(b"\r\n"):
            if not _PART_HEADER.fullmatch(line):
                return None
            if line[:20].lower() == b"content-disposition:":
                disposition = _DISPOSITION.fullmatch(line[20:].strip())
                if disposition is None:
                    return None
        if disposition is None:
            return None
        filename = disposition.group(2)
        parts.append((disposition.group(1).decode(), None if filename is None else filename.decode(), data))
    return parts


async def _parse_multipart(request, body: bytes, limits: Limits) -> list[Part]:
    """Every other multipart body, read by Starlette's parser (python-multipart)."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def replay():
        yield body

    parser = MultiPartParser(Headers(raw=request.headers.raw), replay(), max_files=limits.max_batch_files + 1,
                             max_fields=100, max_part_size=limits.max_body_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise RequestError(f"The multipart body could not be parsed: {error.message}") from None
    try:
        parts = []
        for name, item in form.multi_items():
            if isinstance(item, UploadFile):
                parts.append((name, item.filename or "", await item.read()))
            else:
                parts.append((name, None, item.encode()))
        return parts
    finally:
        await form.close()


def _safe_name(filename: str | None) -> str:
    """A display name only: never used as a path."""
    name = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    return name[:200] or "upload"


@dataclass
class MicroBatcher:
    """Batches concurrent single requests into one model call.

    No timer: the worker takes whatever is queued when it becomes free, so a lone request
    runs at once and, under load, requests that arrive during a model call share the next.
    Nothing is shed: the queue waits instead of answering 503.

    ``inline_max``: a request of at most this many images that finds the model idle and
    nothing queued runs on the event loop itself, without the hop to the model thread and back
    (~0.3 ms of a 4 ms answer at one connection). It first yields once, so that requests that
    arrived with it reach the batcher and it joins them instead: under load every request is
    batched on the model thread while the loop reads the next ones. 0 turns it off.
    """

    predict: Callable[[np.ndarray], np.ndarray]
    max_batch: int = 64
    inline_max: int = 1
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "model"))
    _queue: asyncio.Queue | None = None
    _worker: asyncio.Task | None = None
    _busy: bool = False
    _deciding: int = 0
    batches: int = 0
    items: int = 0

    async def submit(self, images: np.ndarray) -> tuple[np.ndarray, Any]:
        """``images``: uint8 (N, 3, H, W); returns ((N, classes) probabilities, tag).

        ``predict`` may return ``(probabilities, tag)``: every request of that call gets the same
        tag (the service passes the model that ran, so an answer names the version that made it).
        """
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        if len(images) <= self.inline_max and not self._busy and self._queue.empty():
            # Let the requests that arrived with this one reach the batcher first: then they are batched.
            self._deciding += 1
            try:
                await asyncio.sleep(0)
            finally:
                self._deciding -= 1
            if self._deciding == 0 and not self._busy and self._queue.empty():
                self._busy = True
                try:
                    result = self.predict(images)
                finally:
                    self._busy = False
                return self._count(result, len(images))
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((images, future))
        return await future

    def _count(self, result, items: int) -> tuple[np.ndarray, Any]:
        self.batches += 1
        self.items += items
        return result if isinstance(result, tuple) else (result, None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self._queue.get()]
            size = len(pending[0][0])
            while size < self.max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                pending.append(item)
                size += len(item[0])
            pending = [(images, future) for images, future in pending if not future.cancelled()]
            if not pending:
                continue
            self._busy = True
            try:
                stacked = np.concatenate([images for images, _ in pending])
                probabilities, tag = self._count(await loop.run_in_executor(self.executor, self.predict, stacked),
                                                 len(stacked))
            except Exception as error:  # the model failed: every waiter gets the error
                for _, future in pending:
                    if not future.done():
                        future.set_exception(error)
                continue
            finally:
                self._busy = False
            start = 0
            for images, future in pending:
                if not future.done():
                    future.set_result((probabilities[start : start + len(images)], tag))
                start += len(images)


class FirstByteDeadline:
    """ASGI middleware: a request whose answer has not started within ``timeout`` seconds is
    cancelled and answered 504 ``{"error": ...}``. One timer per request, cancelled as soon as the
    answer starts; the request runs in the server's task (no extra task).

    The service puts it in the place of BentoML 1.4's TimeoutMiddleware (same arguments, same
    rule), which leaves its timer, a future and their context alive for the whole timeout after
    every request. With the 60 s default at 3,000 requests/s that is about 180,000 live timers
    per worker, which the cyclic garbage collector walks again and again: full collections of up
    to 76 ms, and a p99 of 5.7x the p50 at 64 connections with a light model.
    """

    def __init__(self, app, timeout: float) -> None:
        self.app, self.timeout = app, timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        task = asyncio.current_task()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(self.timeout, expire)

        async def answer(message) -> None:
            timer.cancel()
            await send(message)

        try:
            await self.app(scope, receive, answer)
        except asyncio.CancelledError:
            if not expired:
                raise
            if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled here
                task.uncancel()
            await error_response(f"No answer within {self.timeout:g} s: the request was cancelled.", 504)(
                scope, receive, send)
        finally:
            timer.cancel()


# ---------------------------------------------------------------------------------------------
# Routes: declared once, in one table; the Router serves them and documents them.


FILE = {"type": "file", "format": "image"}
ANY_JSON = {"type": "object"}


@dataclass(frozen=True)
class Field:
    """One input of a route, as a multipart form field (a file, or text holding JSON or plain text)."""

    name: str
    schema: dict
    description: str = ""
    required: bool = True


@dataclass(frozen=True)
class Route:
    """``handler`` names a method of the bound service: ``async def handler(request) -> Response``.

    ``name`` is what BentoML's clients call it (``client.classify(image=path)``); ``fields`` and
    ``output`` are its inputs and answer as JSON schemas, for ``/schema.json`` and ``/docs.json``.
    A GET route also answers POST: BentoML's clients call every route with POST.
    """

    method: str
    path: str
    handler: str
    summary: str
    name: str = ""
    fields: tuple[Field, ...] = ()
    output: dict = field(default_factory=lambda: dict(ANY_JSON))
    media_type: str = "application/json"

    @property
    def methods(self) -> tuple[str, ...]:
        return (self.method, "POST") if self.method == "GET" else (self.method,)

    def input_schema(self) -> dict:
        return {"type": "object", "title": f"{self.name}_input",
                "properties": {f.name: {**f.schema, **({"description": f.description} if f.description else {})}
                               for f in self.fields},
                "required": [f.name for f in self.fields if f.required]}


def error_response(message: str, status: int, headers: Optional[dict] = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def route_path(scope) -> str:
    """The path below the mount point (Starlette keeps the full path in scope["path"])."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


class Router:
    """An ASGI app over a route table: every route takes the same short path, every miss is JSON."""

    def __init__(self, routes: list[Route], title: str) -> None:
        self.routes = list(routes)
        self.title = title
        self.table: dict[str, dict[str, Route]] = {}
        for route in self.routes:
            for method in route.methods:
                if method in self.table.get(route.path, {}):
                    raise ValueError(f"Route {method} {route.path} is declared twice.")
                self.table.setdefault(route.path, {})[method] = route
        self.target: Any = None

    def bind(self, target: Any) -> None:
        """The object whose methods the routes name (the service instance of this worker)."""
        missing = [r.handler for r in self.routes if not callable(getattr(target, r.handler, None))]
        if missing:
            raise TypeError(f"{type(target).__name__} has no handler {missing[0]!r} for its route table.")
        self.target = target

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if route_path(scope) not in self.table and await self.fall_through(scope, receive, send):
            return
        response = await self.dispatch(scope, receive)
        await response(scope, receive, send)

    async def fall_through(self, scope, receive, send) -> bool:
        """Mounted at "/", this app sees every path the host app did not match before it; the host's
        routes after the mount (BentoML's index page and its assets) still answer theirs."""
        host = scope.get("app")
        routes = getattr(getattr(host, "router", None), "routes", None)
        if not routes:
            return False
        from starlette.routing import Match

        after = False
        for route in routes:
            if getattr(route, "app", None) is self:
                after = True
            elif after:
                match, child = route.matches(scope)
                if match == Match.FULL:
                    await route.handle({**scope, **child}, receive, send)
                    return True
        return False

    async def dispatch(self, scope, receive):
        from starlette.requests import Request

        path, method = route_path(scope), scope["method"]
        methods = self.table.get(path)
        if methods is None:
            return error_response(f"No route {path}: the service answers {', '.join(sorted(self.table))}.", 404)
        route = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
        if route is None:
            allowed = ", ".join(sorted(methods))
            return error_response(f"{method} is not allowed on {path}: use {allowed}.", 405, {"Allow": allowed})
        headers = scope.get("headers", [])
        if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES:
            return error_response(f"The request headers are too large: at most {MAX_HEADERS} headers and "
                                  f"{MAX_HEADER_BYTES:,} bytes in all.", 431)
        if self.target is None:
            return error_response("The service is still starting.", 503)
        request = Request(scope, receive)
        started = time.perf_counter()
        try:
            response = await getattr(self.target, route.handler)(request)
        except RequestError as error:
            return error_response(error.message, error.status)
        except Exception:  # a bug, not the client's fault: log it, answer JSON
            log.exception("%s %s failed", method, path)
            return error_response("Internal error: the server log has the details.", 500)
        response.headers.setdefault("X-Inference-Ms", f"{(time.perf_counter() - started) * 1000:.2f}")
        return response

    def bentoml_routes(self) -> list[dict]:
        """The routes in the shape of BentoML's ``/schema.json``, from which its clients build their methods."""
        return [{"name": r.name or r.handler, "route": r.path, "description": r.summary, "batchable": False,
                 "input": r.input_schema(), "output": {**r.output, **({"media_type": r.media_type}
                                                                     if r.media_type != "application/json" else {})},
                 "is_task": False} for r in self.routes]

    def openapi_paths(self) -> dict[str, dict]:
        """The routes as OpenAPI path items (for ``/docs.json`` and BentoML's page at ``/``)."""
        paths: dict[str, dict] = {}
        errors = {str(code): {"description": text, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"error": {"type": "string"}}}}}}
            for code, text in ((400, "bad input"), (413, "too large"), (415, "wrong content type"))}
        for route in self.routes:
            operation: dict[str, Any] = {
                "summary": route.summary, "operationId": route.name or route.handler, "tags": ["Service APIs"],
                "responses": {"200": {"description": "OK", "content": {route.media_type: {"schema": route.output}}}}}
            if route.fields:
                properties = {f.name: ({"type": "string", "format": "binary"} if f.schema.get("type") == "file" else
                                       {"type": "array", "items": {"type": "string", "format": "binary"}}
                                       if f.schema.get("items", {}).get("type") == "file" else f.schema)
                              | ({"description": f.description} if f.description else {}) for f in route.fields}
                operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "properties": properties,
                    "required": [f.name for f in route.fields if f.required]}}}}
                operation["responses"].update(errors)
            paths.setdefault(route.path, {})[route.method.lower()] = operation
        return paths


def json_response(body: Any, status: int = 200):
    from starlette.responses import Response

    return Response(json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json")
