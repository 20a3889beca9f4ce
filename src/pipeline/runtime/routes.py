"""The route table: one list of :class:`Route` s served by :class:`Router`, a small ASGI app.

Every route gets the same short path (no middleware stack), the OpenAPI document is made from
the same table, and anything the table does not match gets ``{"error": ...}`` with 404, 405
(and an ``Allow`` header) or 431. Kept free of BentoML and torch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline.runtime.bodies import RequestError

log = logging.getLogger("pipeline.runtime")
MAX_HEADER_BYTES = 16 * 1024  # all request headers together; more is a 431
MAX_HEADERS = 100


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
