"""Load the packaged classifier service and a naive peer side by side, on 127.0.0.1 only.

    make package && .venv/bin/python bench/serve_load.py --image some.jpg [--seconds 20 --soak 60]

Measures, with the same client and image:
  * start-up time to /readyz and memory (RSS of the whole process tree) of `bentoml serve`;
  * p50/p99 latency at concurrency 1, and the latency the service adds over an in-process
    call of the same ONNX model on the same decoded image;
  * req/s at 32 concurrent clients, interleaved rounds against the service and a naive peer
    (FastAPI + uvicorn, one model call per request, same ONNX model and decoding);
  * a soak at 32 clients: 5xx and 503 counts.
Traffic is bounded in count and time and goes to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pipeline.runtime.imaging import decode_image  # noqa: E402
from pipeline.runtime.onnx_model import OnnxClassifier  # noqa: E402

PEER = textwrap.dedent('''
    import sys
    from fastapi import FastAPI, File, HTTPException, UploadFile
    sys.path.insert(0, {src!r})
    from pipeline.runtime.imaging import ImageDecodeError, decode_image
    from pipeline.runtime.onnx_model import OnnxClassifier
    model = OnnxClassifier.from_dir({model_dir!r})
    app = FastAPI()

    @app.post("/classify")
    def classify(image: UploadFile = File(...)):
        try:
            array = decode_image(image.file.read(), model.image_size)
        except ImageDecodeError as error:
            raise HTTPException(400, str(error))
        row = model.predict_proba(array)[0]
        return {{"label": model.classes[int(row.argmax())],
                 "probabilities": dict(zip(model.classes, map(float, row)))}}
''')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


def start(cmd: list[str], url: str, log: Path, env: dict) -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                               start_new_session=True)
    while time.perf_counter() - started < 60:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return process, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise SystemExit(f"{cmd} not ready in 60 s")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def multipart_request(host: str, port: int, path: str, data: bytes) -> bytes:
    """One pre-encoded HTTP/1.1 request: the load generator spends its CPU on sockets, not encoding."""
    boundary = b"benchboundary7d1f"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="img.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n--" + boundary + b"--\r\n")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary.decode()}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def load(url: str, data: bytes, clients: int, seconds: float, max_requests: int) -> dict:
    """``clients`` keep-alive connections sending the same request back to back."""
    host, port_path = url.removeprefix("http://").split(":", 1)
    port, path = port_path.split("/", 1)
    request = multipart_request(host, int(port), "/" + path, data)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors, sent
        reader = writer = None
        while time.perf_counter() < deadline and sent < max_requests:
            sent += 1
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(request)
                status = await asyncio.wait_for(read_response(reader), 30)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(clients)])
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
            "rps": len(latencies) / elapsed, "n": len(latencies), "statuses": statuses, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True)
    parser.add_argument("--seconds", type=float, default=15, help="per throughput round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--soak", type=float, default=60, help="seconds at 32 clients against the service")
    parser.add_argument("--bento", default="cifar4_classifier:latest")
    args = parser.parse_args()
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    env.setdefault("BENTOML_HOME", str(ROOT / "bentoml_home"))
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    import bentoml

    stored = bentoml.models.get("cifar4-classifier:latest")
    model = OnnxClassifier.from_dir(stored.path)
    data = Path(args.image).read_bytes()
    decoded = decode_image(data, model.image_size)
    bentoml_bin = str(Path(sys.executable).parent / "bentoml")
    console = Console(width=130)

    # In-process reference: the same model on the same decoded image.
    for _ in range(50):
        model.predict_proba(decoded)
    in_process = []
    for _ in range(500):
        t0 = time.perf_counter()
        model.predict_proba(decoded)
        in_process.append((time.perf_counter() - t0) * 1000)
    in_p50 = statistics.median(in_process)

    tmp = Path(tempfile.mkdtemp())
    port, peer_port = free_port(), free_port()
    service, startup = start([bentoml_bin, "serve", args.bento, "--host", "127.0.0.1", "--port", str(port),
                              "--timeout-keep-alive", "75"],
                             f"http://127.0.0.1:{port}/readyz", tmp / "service.log", env)
    peer_file = tmp / "peer.py"
    peer_file.write_text(PEER.format(src=str(ROOT / "src"), model_dir=str(stored.path)))
    peer, _ = start([sys.executable, "-m", "uvicorn", "peer:app", "--app-dir", str(tmp), "--host", "127.0.0.1",
                     "--port", str(peer_port), "--log-level", "warning"],
                    f"http://127.0.0.1:{peer_port}/docs", tmp / "peer.log", env)
    service_url, peer_url = f"http://127.0.0.1:{port}/classify", f"http://127.0.0.1:{peer_port}/classify"
    try:
        idle_rss = tree_rss_mb(service.pid)
        asyncio.run(load(service_url, data, 1, 3, 200))  # warm-up
        asyncio.run(load(peer_url, data, 1, 3, 200))
        single = asyncio.run(load(service_url, data, 1, 10, 2000))
        peer_single = asyncio.run(load(peer_url, data, 1, 10, 2000))
        service_rps, peer_rps = [], []
        for _ in range(args.rounds):
            service_rps.append(asyncio.run(load(service_url, data, 32, args.seconds, 100_000))["rps"])
            peer_rps.append(asyncio.run(load(peer_url, data, 32, args.seconds, 100_000))["rps"])
        soak = asyncio.run(load(service_url, data, 32, args.soak, 1_000_000))
        loaded_rss = tree_rss_mb(service.pid)
    finally:
        stop(service)
        stop(peer)

    table = Table(title="Classifier service vs naive FastAPI peer (same ONNX model, same image)")
    for column in ("measure", "service", "naive peer", "ratio / note"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row("in-process model call p50 (ms)", f"{in_p50:.3f}", "", "reference")
    table.add_row("concurrency 1: p50 / p99 (ms)", f"{single['p50']:.2f} / {single['p99']:.2f}",
                  f"{peer_single['p50']:.2f} / {peer_single['p99']:.2f}", "")
    table.add_row("p50 added over in-process (ms)", f"{single['p50'] - in_p50:.2f}", "",
                  "target <= 2 ms")
    med_s, med_p = statistics.median(service_rps), statistics.median(peer_rps)
    table.add_row(f"32 clients: req/s (median of {args.rounds})", f"{med_s:,.0f}", f"{med_p:,.0f}",
                  f"{med_s / med_p:.2f}x (target >= 1.5x)")
    table.add_row(f"soak {args.soak:.0f} s at 32 clients", f"{soak['n']:,} req, p50 {soak['p50']:.1f} ms, "
                  f"p99 {soak['p99']:.1f} ms", "", f"statuses {soak['statuses']}, conn errors {soak['errors']}")
    fivexx = sum(v for k, v in soak["statuses"].items() if k >= 500)
    table.add_row("soak 5xx / 503", f"{fivexx} / {soak['statuses'].get(503, 0)}", "", "target 0 / 0")
    table.add_row("service RSS, all processes (MB)", f"idle {idle_rss:,.0f}, loaded {loaded_rss:,.0f}", "",
                  "target <= 1024")
    table.add_row("start to /readyz (s)", f"{startup:.1f}", "", "target <= 10")
    console.print(table)
    console.print(f"rounds: service {[round(r) for r in service_rps]}, peer {[round(r) for r in peer_rps]}")
    import bentoml as b
    import onnxruntime

    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; python "
                  f"{platform.python_version()}, bentoml {b.__version__}, onnxruntime {onnxruntime.__version__}; "
                  f"model {stored.tag} ({stored.info.metadata.get('arch')})")


if __name__ == "__main__":
    main()
