"""Request bodies: size and time limits, multipart parsing into uploads, and the client-error type.

Kept free of BentoML and torch so it is small, testable and fast to import.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Optional

from pipeline.runtime.model_folder import MAX_PIXELS
from pipeline.runtime.settings import Settings

class RequestError(Exception):
    """A client mistake: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


@dataclass

class Limits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
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
