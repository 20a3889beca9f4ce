"""HTTP plumbing for the classifier service: bounded bodies, multipart parsing, micro-batching.

Kept free of BentoML and torch so it is small, testable and fast to import.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


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

    @classmethod
    def from_env(cls) -> "Limits":
        defaults = cls()
        return cls(
            max_body_bytes=int(os.environ.get("CLASSIFIER_MAX_BODY_BYTES", defaults.max_body_bytes)),
            max_pixels=int(os.environ.get("CLASSIFIER_MAX_PIXELS", defaults.max_pixels)),
            max_batch_files=int(os.environ.get("CLASSIFIER_MAX_BATCH_FILES", defaults.max_batch_files)),
            read_timeout_s=float(os.environ.get("CLASSIFIER_READ_TIMEOUT_S", defaults.read_timeout_s)),
        )


@dataclass
class Upload:
    name: str
    data: bytes


async def read_body(request, limit: int, timeout: float) -> bytes:
    """The whole body, refusing (413) anything over ``limit`` before and while reading it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(f"Content-Length {declared!r} is not a number.")
        if int(declared) > limit:
            raise RequestError(f"The body is {int(declared):,} bytes, over the limit of {limit:,} bytes.", 413)
    chunks, size = [], 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"The body is over the limit of {limit:,} bytes.", 413)
            chunks.append(chunk)

    try:
        if hasattr(asyncio, "timeout"):  # Python 3.11+: no extra task per request
            async with asyncio.timeout(timeout):
                await collect()
        else:
            await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"The body did not arrive within {timeout:g} s.", 408) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def parse_uploads(request, body: bytes, field_name: str, limits: Limits) -> list[Upload]:
    """Images from a multipart form field ``field_name``, or the raw body when it is an image type."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        from starlette.datastructures import Headers, UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def replay():
            yield body

        parser = MultiPartParser(Headers(raw=request.headers.raw), replay(),
                                 max_files=limits.max_batch_files + 1, max_fields=100,
                                 max_part_size=limits.max_body_bytes)
        try:
            form = await parser.parse()
        except MultiPartException as error:
            raise RequestError(f"The multipart body could not be parsed: {error.message}") from None
        try:
            items = form.getlist(field_name)
            uploads = []
            for item in items:
                if isinstance(item, UploadFile):
                    uploads.append(Upload(_safe_name(item.filename), await item.read()))
                else:
                    raise RequestError(f"Form field {field_name!r} must be a file upload, not text.")
            if not uploads:
                found = ", ".join(repr(key) for key in form.keys()) or "none"
                raise RequestError(f"The form has no file field {field_name!r} (fields found: {found}).")
            return uploads
        finally:
            await form.close()
    if media_type.startswith("image/") or media_type == "application/octet-stream":
        if not body:
            raise RequestError("The request body is empty: send an image.")
        return [Upload("body", body)]
    shown = media_type or "none"
    raise RequestError(
        f"Unsupported content type {shown!r}: send multipart/form-data with a file field {field_name!r}, "
        "or the raw image with an image/* content type.", 415,
    )


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
    """

    predict: Callable[[np.ndarray], np.ndarray]
    max_batch: int = 64
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "model"))
    _queue: asyncio.Queue | None = None
    _worker: asyncio.Task | None = None
    batches: int = 0
    items: int = 0

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """``images``: uint8 (N, 3, H, W); returns (N, classes) probabilities."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((images, future))
        return await future

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
            try:
                stacked = np.concatenate([images for images, _ in pending])
                probabilities = await loop.run_in_executor(self.executor, self.predict, stacked)
            except Exception as error:  # the model failed: every waiter gets the error
                for _, future in pending:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.batches += 1
            self.items += len(stacked)
            start = 0
            for images, future in pending:
                if not future.done():
                    future.set_result(probabilities[start : start + len(images)])
                start += len(images)
