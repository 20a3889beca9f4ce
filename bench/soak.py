"""Soak the classifier service: 32 clients, mixed valid and invalid images, for 5 minutes.

    make package && .venv/bin/python bench/soak.py --image some.jpg [--minutes 5 --clients 32]

Starts `bentoml serve` of the packaged bento on 127.0.0.1, sends a bounded mix (3 valid
images to 1 invalid body, cycling through several kinds) and reports per minute: requests,
status counts, dropped connections, p50/p99 latency and the service's RSS (all processes).
Targets (issue 5): zero 5xx, zero dropped connections, RSS growth <= 50 MB from minute 1 to
the last minute. Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, start, stop, tree_rss_mb  # noqa: E402


def payloads(image: bytes) -> list[tuple[str, bytes, int]]:
    png = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGBA").save(png, format="PNG")
    return [("valid jpeg", image, 200), ("valid png", png.getvalue(), 200), ("valid jpeg", image, 200),
            ("text", b"not an image at all", 400), ("valid jpeg", image, 200), ("valid png", png.getvalue(), 200),
            ("truncated", image[: len(image) // 3], 400), ("valid jpeg", image, 200), ("empty", b"", 400)]


async def soak(url: str, image: bytes, clients: int, seconds: float, pid: int, console: Console) -> list[dict]:
    mix = payloads(image)
    minutes: list[dict] = []
    started = time.perf_counter()
    current = {"latencies": [], "statuses": {}, "dropped": 0, "unexpected": 0}
    counter = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal counter
        while time.perf_counter() - started < seconds:
            name, data, expected = mix[counter % len(mix)]
            counter += 1
            t0 = time.perf_counter()
            try:
                response = await client.post(url, files={"image": (f"{name}.img", data, "application/octet-stream")})
            except httpx.HTTPError as error:
                current["dropped"] += 1
                why = f"{type(error).__name__} on {name}"
                current.setdefault("why", {}).setdefault(why, 0)
                current["why"][why] += 1
                continue
            current["latencies"].append(time.perf_counter() - t0)
            current["statuses"][response.status_code] = current["statuses"].get(response.status_code, 0) + 1
            current["unexpected"] += response.status_code != expected

    async def sampler() -> None:
        nonlocal current
        while time.perf_counter() - started < seconds:
            await asyncio.sleep(min(60, max(0.1, seconds - (time.perf_counter() - started))))
            done, current = current, {"latencies": [], "statuses": {}, "dropped": 0, "unexpected": 0}
            done["rss"] = tree_rss_mb(pid)
            minutes.append(done)
            console.print(f"minute {len(minutes)}: {len(done['latencies'])} req, {done['statuses']}, "
                          f"dropped {done['dropped']} {done.get('why', '')}, RSS {done['rss']:.0f} MB")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(sampler(), *[worker(client) for _ in range(clients)])
    return minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--bento", default="cifar4_classifier:latest")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    env.setdefault("BENTOML_HOME", str(root / "bentoml_home"))
    port = free_port()
    console = Console(width=130)
    service, startup = start([str(Path(sys.executable).parent / "bentoml"), "serve", args.bento, "--host", "127.0.0.1",
                              "--port", str(port), "--timeout-keep-alive", "75"],
                             f"http://127.0.0.1:{port}/readyz",
                             Path(tempfile.mkdtemp()) / "service.log", env)
    try:
        minutes = asyncio.run(soak(f"http://127.0.0.1:{port}/classify", Path(args.image).read_bytes(),
                                   args.clients, args.minutes * 60, service.pid, console))
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").status_code
    finally:
        stop(service)
    table = Table(title=f"Soak: {args.clients} clients, {args.minutes:g} min, mixed valid/invalid")
    for column in ("minute", "requests", "statuses", "5xx", "dropped", "unexpected", "p50 ms", "p99 ms", "RSS MB"):
        table.add_column(column, justify="right")
    for i, m in enumerate(minutes, 1):
        ms = np.array(m["latencies"]) * 1000
        table.add_row(str(i), f"{len(ms):,}", str(dict(sorted(m["statuses"].items()))),
                      str(sum(v for k, v in m["statuses"].items() if k >= 500)), str(m["dropped"]),
                      str(m["unexpected"]), f"{np.percentile(ms, 50):.1f}", f"{np.percentile(ms, 99):.1f}",
                      f"{m['rss']:.0f}")
    console.print(table)
    growth = minutes[-1]["rss"] - minutes[0]["rss"]
    total = sum(len(m["latencies"]) for m in minutes)
    console.print(f"total {total:,} requests; RSS growth minute 1 -> {len(minutes)}: {growth:+.0f} MB; "
                  f"/readyz after: {ready}; start-up {startup:.1f} s")


if __name__ == "__main__":
    main()
