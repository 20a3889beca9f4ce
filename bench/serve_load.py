"""Load the packaged classifier service and two peers side by side, on 127.0.0.1 only.

    make package && .venv/bin/python bench/serve_load.py --image some.jpg [--seconds 15 --rounds 3 --soak 60]

Peers, on the same ONNX model and the same decode: a naive FastAPI + uvicorn app (one model
call per request), and LitServe with batching on, in the best of the configurations tried
(``--litserve-configs``: workers x max batch size). Load comes from ``wrk`` (Debian's
package; `apt-get install wrk`) when it is installed, else from a Python client.

Measures, with the same client and image:
  * start-up time to /readyz and memory (RSS of the whole process tree) of `bentoml serve`;
  * at 1, 32 and 64 connections: req/s, p50 and p99 latency, errors, for every server, in
    interleaved rounds (median over rounds); the servers not under load are paused (SIGSTOP);
  * the latency the service adds over an in-process call of the same ONNX model at 1 connection;
  * a soak at 32 clients: 5xx and 503 counts.
Traffic is bounded in count and time and goes to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
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


LITSERVE = textwrap.dedent('''
    import sys
    import litserve as ls
    sys.path.insert(0, {src!r})
    from pipeline.runtime.imaging import decode_image
    from pipeline.runtime.onnx_model import OnnxClassifier
    import numpy as np

    class Classifier(ls.LitAPI):
        def setup(self, device):
            self.model = OnnxClassifier.from_dir({model_dir!r}, threads=1, spinning=False)

        def decode_request(self, request):
            return decode_image(request["image"].file.read(), self.model.image_size)

        def batch(self, inputs):
            return np.stack(inputs)

        def predict(self, images):
            return self.model.predict_proba(images)

        def unbatch(self, output):
            return list(output)

        def encode_response(self, row):
            return {{"label": self.model.classes[int(row.argmax())],
                     "probabilities": dict(zip(self.model.classes, map(float, row)))}}

    if __name__ == "__main__":
        api = Classifier(max_batch_size={batch}, batch_timeout=0.002, api_path="/classify")
        ls.LitServer(api, accelerator="cpu", workers_per_device={workers}, timeout=60).run(
            port={port}, host="127.0.0.1", generate_client_file=False)
''')

WRK_SCRIPT = '''
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=benchboundary7d1f"
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.body = f:read("*all")
f:close()
'''


def wrk_load(url: str, body_file: Path, script: Path, clients: int, seconds: float) -> dict:
    """``clients`` keep-alive connections from wrk (one thread: the other core serves)."""
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "--timeout", "30s",
                          "-s", str(script), url], capture_output=True, text=True,
                         env={**os.environ, "BENCH_BODY": str(body_file)}, timeout=seconds + 60).stdout

    def latency(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    return {"p50": latency("50"), "p99": latency("99"), "rps": rps, "n": total, "errors": errors,
            "statuses": {"non-2xx": int(non2xx.group(1)) if non2xx else 0}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def median_ms(fn, rounds: int, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


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


@contextlib.contextmanager
def paused(processes: list[subprocess.Popen]):
    """SIGSTOP the other servers while one is measured: LitServe's idle workers poll their queues
    (about a quarter of a core here), which would be taken from whichever server is under load."""
    for process in processes:
        os.killpg(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGCONT)


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
    parser.add_argument("--seconds", type=float, default=15, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", default="1,32,64")
    parser.add_argument("--soak", type=float, default=60, help="seconds at 32 clients against the service")
    parser.add_argument("--litserve-configs", default="1x16,2x16", help="WORKERSxMAX_BATCH, comma-separated")
    parser.add_argument("--bento", default="cifar4_classifier:latest")
    args = parser.parse_args()
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    env.setdefault("BENTOML_HOME", str(ROOT / "bentoml_home"))
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    import bentoml

    stored = bentoml.models.get("cifar4-classifier:latest")
    # The service's layout comes from the environment (CLASSIFIER_WORKERS, CLASSIFIER_THREADS), as in
    # production; the in-process reference uses the same ONNX Runtime threads as one service worker.
    from pipeline.runtime.settings import Settings

    layout = Settings.from_env()
    model = OnnxClassifier.from_dir(stored.path, threads=layout.thread_count)
    data = Path(args.image).read_bytes()
    decoded = decode_image(data, model.image_size)
    bentoml_bin = str(Path(sys.executable).parent / "bentoml")
    console = Console(width=150)
    connections = [int(c) for c in args.connections.split(",")]
    use_wrk = shutil.which("wrk") is not None

    # In-process reference: the same model on the same decoded image, one thread (as each worker).
    # It is measured again in every round, beside that round's 1-connection load, because the
    # machine's speed drifts over minutes (2.93 to 3.27 ms for the same call in one afternoon).
    def in_process_p50() -> float:
        return median_ms(lambda: model.predict_proba(decoded), 300, warmup=30)

    in_process: list[float] = []
    # The model-only ceiling: what the cores could serve if HTTP, decode and JSON cost nothing
    # (batches of the service's size, one ONNX Runtime thread per core).
    single = OnnxClassifier.from_dir(stored.path, threads=1)
    batch = np.repeat(decoded[None] if decoded.ndim == 3 else decoded, layout.model_batch, axis=0)
    ms_per_image = median_ms(lambda: single.predict_proba(batch, chunk=layout.model_batch), 15) / len(batch)
    ceiling = (os.cpu_count() or 1) * 1000 / ms_per_image
    del single

    tmp = Path(tempfile.mkdtemp())
    body_file, script = tmp / "body.bin", tmp / "post.lua"
    request = multipart_request("127.0.0.1", 1, "/classify", data)
    body_file.write_bytes(request.split(b"\r\n\r\n", 1)[1])
    script.write_text(WRK_SCRIPT)

    def run_load(url: str, clients: int, seconds: float) -> dict:
        if use_wrk:
            return wrk_load(url, body_file, script, clients, seconds)
        return asyncio.run(load(url, data, clients, seconds, 1_000_000))

    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        port = free_port()
        service, startup = start([bentoml_bin, "serve", args.bento, "--host", "127.0.0.1", "--port", str(port),
                                  "--timeout-keep-alive", "75"],
                                 f"http://127.0.0.1:{port}/readyz", tmp / "service.log", env)
        servers["service"] = (service, f"http://127.0.0.1:{port}/classify")
        idle_rss = tree_rss_mb(service.pid)
        peer_port = free_port()
        (tmp / "peer.py").write_text(PEER.format(src=str(ROOT / "src"), model_dir=str(stored.path)))
        peer, _ = start([sys.executable, "-m", "uvicorn", "peer:app", "--app-dir", str(tmp), "--host", "127.0.0.1",
                         "--port", str(peer_port), "--log-level", "warning"],
                        f"http://127.0.0.1:{peer_port}/docs", tmp / "peer.log", env)
        servers["naive FastAPI"] = (peer, f"http://127.0.0.1:{peer_port}/classify")

        # LitServe: keep the configuration that serves the most at 32 connections, each tried alone.
        def try_litserve(config: str) -> tuple[float, subprocess.Popen, str, str]:
            workers, batch = (int(v) for v in config.split("x"))
            lit_port = free_port()
            (tmp / f"lit_{config}.py").write_text(LITSERVE.format(src=str(ROOT / "src"), model_dir=str(stored.path),
                                                                 batch=batch, workers=workers, port=lit_port))
            lit, _ = start([sys.executable, str(tmp / f"lit_{config}.py")], f"http://127.0.0.1:{lit_port}/health",
                           tmp / f"lit_{config}.log", env)
            url = f"http://127.0.0.1:{lit_port}/classify"
            run_load(url, 32, 3)
            rps = run_load(url, 32, args.seconds)["rps"]
            litserve_tried.append(f"{workers} worker(s), batch {batch}: {rps:,.0f} req/s")
            return rps, lit, url, f"LitServe ({workers}w, batch {batch})"

        best, litserve_tried = None, []
        for config in args.litserve_configs.split(","):
            with paused([process for process, _ in servers.values()] + ([best[1]] if best else [])):
                tried = try_litserve(config)
            if best is None or tried[0] > best[0]:
                best, loser = tried, best
            else:
                loser = tried
            if loser is not None:
                stop(loser[1])
        servers[best[3]] = (best[1], best[2])

        def alone(name: str):
            return paused([process for other, (process, _) in servers.items() if other != name])

        for name, (_, url) in servers.items():  # warm-up
            with alone(name):
                run_load(url, 32, 3)
        results: dict[tuple[str, int], list[dict]] = {}
        loaded_rss = idle_rss
        for _ in range(args.rounds):
            with paused([process for process, _ in servers.values()]):
                in_process.append(in_process_p50())
            for clients in connections:
                for name, (process, url) in servers.items():
                    with alone(name):
                        results.setdefault((name, clients), []).append(run_load(url, clients, args.seconds))
                        if name == "service":
                            loaded_rss = max(loaded_rss, tree_rss_mb(service.pid))
        with alone("service"):
            soak = run_load(servers["service"][1], 32, args.soak)
    finally:
        for process, _ in servers.values():
            stop(process)

    def median(name: str, clients: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, clients)])

    names = list(servers)
    table = Table(title=f"Classifier service vs peers, same ONNX model and image, load from "
                        f"{'wrk -t1' if use_wrk else 'a Python client'}, median of {args.rounds} rounds of "
                        f"{args.seconds:.0f} s")
    table.add_column("connections", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("service / peers", justify="right")
    for clients in connections:
        cells = []
        for name in names:
            errors = sum(r["errors"] for r in results[(name, clients)])
            cells.append(f"{median(name, clients, 'rps'):,.0f} req/s\np50 {median(name, clients, 'p50'):.2f} ms, "
                         f"p99 {median(name, clients, 'p99'):.2f} ms\nerrors {errors}")
        ratios = [f"{median('service', clients, 'rps') / median(n, clients, 'rps'):.2f}x {n.split(' ')[0]}"
                  for n in names[1:]]
        tail = median("service", clients, "p99") / median("service", clients, "p50")
        table.add_row(str(clients), *cells, "\n".join(ratios + [f"service p99/p50 {tail:.1f}"]))
    console.print(table)
    summary = Table(title="Service")
    for column in ("measure", "value", "target"):
        summary.add_column(column)
    added = statistics.median(r["p50"] - ref for r, ref in zip(results[("service", connections[0])], in_process))
    summary.add_row(f"in-process model call p50, {layout.thread_count} thread(s), per round",
                    ", ".join(f"{v:.3f}" for v in in_process) + " ms", "reference")
    summary.add_row(f"model-only ceiling: {os.cpu_count()} cores / {ms_per_image:.2f} ms per image (batch "
                    f"{layout.model_batch}, 1 thread)", f"{ceiling:,.0f} req/s; service at {connections[-1]} connections: "
                    f"{median('service', connections[-1], 'rps') / ceiling:.0%} of it", "")
    summary.add_row("service layout", f"{layout.worker_count} worker(s) x {layout.thread_count} ONNX Runtime "
                    f"thread(s), batches of up to {layout.model_batch}", "")
    summary.add_row("p50 added over in-process at 1 connection (median of the rounds' differences)",
                    f"{added:.2f} ms", "<= 1 ms")
    fivexx = soak["statuses"].get("non-2xx", 0) if use_wrk else sum(v for k, v in soak["statuses"].items() if k >= 500)
    summary.add_row(f"soak {args.soak:.0f} s at 32 connections", f"{soak['n']:,} requests, p50 {soak['p50']:.1f} ms, "
                    f"p99 {soak['p99']:.1f} ms, errors {soak['errors']}, non-2xx {fivexx}", "0 errors")
    summary.add_row("RSS, all service processes", f"idle {idle_rss:,.0f} MB, under load {loaded_rss:,.0f} MB", "<= 500 MB")
    summary.add_row("start to /readyz", f"{startup:.1f} s", "<= 3 s")
    console.print(summary)
    console.print("LitServe configurations tried at 32 connections: " + "; ".join(litserve_tried))
    import bentoml as b
    import onnxruntime

    versions = f"bentoml {b.__version__}, onnxruntime {onnxruntime.__version__}"
    try:
        import litserve

        versions += f", litserve {litserve.__version__}"
    except ImportError:
        pass
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; python "
                  f"{platform.python_version()}, {versions}; model {stored.tag} ({stored.info.metadata.get('arch')}, "
                  f"TTA {stored.info.metadata.get('tta', 0)})")


if __name__ == "__main__":
    main()
