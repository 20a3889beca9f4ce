"""What one /classify request costs the event loop, piece by piece, old way against new way.

    .venv/bin/python bench/request_cost.py [--image some.jpg] [--rounds 2000] [--compare DIR]

Side by side in one run, median of ``--rounds`` calls each:
  * decode: ``decode_image`` (small JPEGs through simplejpeg) against the Pillow-only path;
  * multipart: the one-pass split against Starlette's parser, through ``parse_uploads``;
  * deadline: ``FirstByteDeadline`` against BentoML's ``TimeoutMiddleware`` around an empty app,
    and how many timers each leaves alive after the requests (BentoML's live for 60 s).
Each is timed twice: back to back ("hot"), and right after a model call ("after the model"),
as in the service, where ONNX Runtime has just pushed the request path out of the CPU caches.
The model is the packaged ``cifar4-classifier:latest`` (``BENTOML_HOME``); without one, a
64 MB memory sweep stands in for it. ``--compare DIR`` also decodes every JPEG under DIR both
ways and counts the images whose pixels differ (it should be none).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pipeline.runtime import bodies, imaging  # noqa: E402
from pipeline.runtime.deadline import FirstByteDeadline  # noqa: E402


def timed(fn, rounds: int, between=None) -> float:
    """Median microseconds of ``fn()``; ``between()`` runs untimed before each call."""
    for _ in range(20):
        fn()
    times = []
    for _ in range(rounds):
        if between is not None:
            between()
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e6)
    return statistics.median(times)


@contextlib.contextmanager
def pillow_path():
    """``decode_image`` as it runs without simplejpeg."""
    imaging.simplejpeg, saved = None, imaging.simplejpeg
    try:
        yield
    finally:
        imaging.simplejpeg = saved


def flusher():
    """A model call of the packaged model, or a 64 MB sweep when there is none."""
    try:
        os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
        import bentoml

        from pipeline.runtime.onnx_model import OnnxClassifier

        stored = bentoml.models.get("cifar4-classifier:latest")
        model = OnnxClassifier.from_dir(stored.path, threads=1, spinning=False)
        image = np.zeros((1, 3, model.image_size, model.image_size), np.uint8)
        return (lambda: model.predict_proba(image)), f"a call of {stored.tag} ({stored.info.metadata.get('arch')})"
    except Exception:  # noqa: BLE001 - no store or no model: the sweep stands in
        sweep = np.ones(64 * 2**20 // 8)
        return (lambda: sweep.sum()), "a 64 MB memory sweep (no packaged model found)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="a JPEG (default: a 32x32 noise JPEG made here)")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--compare", help="a folder: decode every JPEG in it both ways and count differences")
    args = parser.parse_args()

    import bentoml
    import httpx
    import simplejpeg
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from PIL import Image
    from rich.console import Console
    from rich.table import Table
    from starlette.requests import Request

    if args.image:
        data = Path(args.image).read_bytes()
    else:
        buffer = io.BytesIO()
        Image.effect_noise((32, 32), 60).convert("RGB").save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
    model_call, flushed_by = flusher()
    rows = []

    def compare(name: str, old, new, old_label: str, new_label: str) -> None:
        for when, between in (("hot", None), ("after the model", model_call)):
            rounds = args.rounds if between is None else max(200, args.rounds // 10)
            before, after = timed(old, rounds, between), timed(new, rounds, between)
            rows.append((name, when, f"{old_label}: {before:,.1f} us", f"{new_label}: {after:,.1f} us",
                         f"{before / after:.1f}x"))

    # Decode: the same function with and without simplejpeg.
    def pillow_only():
        with pillow_path():
            imaging.decode_image(data, 32)

    fast = imaging._decode_small_jpeg(data, 32, imaging.MAX_PIXELS) is not None
    compare("decode" + ("" if fast else " (this image takes Pillow's path)"), pillow_only,
            lambda: imaging.decode_image(data, 32), "Pillow", "simplejpeg" if fast else "Pillow")

    # Multipart: parse_uploads with and without the one-pass split.
    request = httpx.Request("POST", "http://127.0.0.1/classify", files={"image": ("x.jpg", data, "image/jpeg")})
    body, content_type = request.read(), request.headers["content-type"]
    scope = {"type": "http", "method": "POST", "path": "/classify", "query_string": b"",
             "headers": [(b"content-type", content_type.encode())]}
    limits = bodies.Limits()
    loop = asyncio.new_event_loop()

    def parse(split: bool):
        def run():
            saved = bodies.split_plain_multipart
            if not split:
                bodies.split_plain_multipart = lambda *a: None
            try:
                loop.run_until_complete(bodies.parse_uploads(Request(scope), body, "image", limits))
            finally:
                bodies.split_plain_multipart = saved
        return run

    compare("multipart", parse(False), parse(True), "Starlette", "one-pass split")

    # The request deadline around an app that answers at once.
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def sent(message):
        return None

    def through(middleware):
        return lambda: loop.run_until_complete(middleware({"type": "http", "path": "/"}, None, sent))

    bentoml_mw, ours = TimeoutMiddleware(app, 60), FirstByteDeadline(app, 60)
    compare("deadline", through(bentoml_mw), through(ours), "BentoML", "FirstByteDeadline")

    def live_timers() -> int:
        return sum(isinstance(o, asyncio.TimerHandle) and not o.cancelled() for o in gc.get_objects())

    def left_behind(middleware) -> int:
        before = live_timers()
        for _ in range(1000):
            through(middleware)()
        return live_timers() - before

    live_theirs, live_ours = left_behind(TimeoutMiddleware(app, 60)), left_behind(FirstByteDeadline(app, 60))
    loop.close()

    table = Table(title=f"One request's pieces, median of {args.rounds} calls (hot) or {max(200, args.rounds // 10)} "
                        f"(after the model: {flushed_by})")
    for column in ("piece", "when", "before", "now", "ratio"):
        table.add_column(column, justify="right" if column == "ratio" else "left")
    for row in rows:
        table.add_row(*row)
    console = Console(width=140)
    console.print(table)
    console.print(f"live timers after 1,000 requests: BentoML's TimeoutMiddleware {live_theirs:,}, "
                  f"FirstByteDeadline {live_ours:,} (BentoML's each live for the 60 s timeout)")
    if args.compare:
        files = sorted(p for p in Path(args.compare).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        taken = differ = 0
        for path in files:
            raw = path.read_bytes()
            new = imaging.decode_image(raw, 32)
            taken += imaging._decode_small_jpeg(raw, 32, imaging.MAX_PIXELS) is not None
            with pillow_path():
                differ += not np.array_equal(new, imaging.decode_image(raw, 32))
        console.print(f"{args.compare}: {len(files):,} JPEGs, {taken:,} through simplejpeg, {differ:,} with pixels "
                      "that differ from Pillow's")
    import onnxruntime
    import PIL
    import starlette

    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; python "
                  f"{platform.python_version()}; pillow {PIL.__version__}, simplejpeg {simplejpeg.__version__}, "
                  f"starlette {starlette.__version__}, bentoml {bentoml.__version__}, onnxruntime "
                  f"{onnxruntime.__version__}; image {len(data):,} bytes")


if __name__ == "__main__":
    main()
