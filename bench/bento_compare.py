"""Two bentos of the service side by side: the same model, the same image, interleaved rounds.

    .venv/bin/python bench/bento_compare.py --image boat.jpg --bentos cifar4_classifier:OLD,cifar4_classifier:NEW

For a change to the service itself (its routes, its answer): build the old code's bento next to the
new one (``bentoml build -f service/bentofile.yaml .`` in a worktree of the old commit, with the same
``BENTOML_HOME``), then load both with wrk at each connection count, one at a time (the other is
paused with SIGSTOP), and print the medians over rounds and the new/old ratios. Loopback only,
bounded in time. Needs Debian's ``wrk``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (  # noqa: E402
    ROOT, WRK_SCRIPT, free_port, multipart_request, paused, start, stop, wrk_load,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True)
    parser.add_argument("--bentos", required=True, help="OLD,NEW bento tags")
    parser.add_argument("--connections", default="1,32")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    env.setdefault("BENTOML_HOME", str(ROOT / "bentoml_home"))
    tags = args.bentos.split(",")
    connections = [int(c) for c in args.connections.split(",")]
    tmp = Path(tempfile.mkdtemp())
    body_file, script = tmp / "body.bin", tmp / "post.lua"
    body_file.write_bytes(multipart_request("127.0.0.1", 1, "/classify", Path(args.image).read_bytes())
                          .split(b"\r\n\r\n", 1)[1])
    script.write_text(WRK_SCRIPT)
    servers = {}
    try:
        for i, tag in enumerate(tags):
            port = free_port()
            process, _ = start([str(Path(sys.executable).parent / "bentoml"), "serve", tag, "--host", "127.0.0.1",
                                "--port", str(port), "--timeout-keep-alive", "75"],
                               f"http://127.0.0.1:{port}/readyz", tmp / f"serve{i}.log", env)
            servers[tag] = (process, f"http://127.0.0.1:{port}/classify")
        results: dict[tuple[str, int], list[dict]] = {}
        for tag, (_, url) in servers.items():  # warm-up
            with paused([p for t, (p, _) in servers.items() if t != tag]):
                wrk_load(url, body_file, script, 32, 3)
        for _ in range(args.rounds):
            for clients in connections:
                for tag, (_, url) in servers.items():
                    with paused([p for t, (p, _) in servers.items() if t != tag]):
                        results.setdefault((tag, clients), []).append(
                            wrk_load(url, body_file, script, clients, args.seconds))
    finally:
        for process, _ in servers.values():
            stop(process)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    table = Table(title=f"{args.image}: median of {args.rounds} interleaved rounds of {args.seconds:g} s; "
                        f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}")
    for column in ("connections", "bento", "req/s", "p50 ms", "p99 ms", "errors", "req/s new/old"):
        table.add_column(column, justify="right")
    for clients in connections:
        rps = {}
        for tag in tags:
            runs = results[(tag, clients)]
            rps[tag] = statistics.median(r["rps"] for r in runs)
            ratio = "" if tag == tags[0] else f"{rps[tag] / rps[tags[0]]:.3f}"
            spread = f"{min(r['rps'] for r in runs):,.0f}-{max(r['rps'] for r in runs):,.0f}"
            table.add_row(str(clients), tag, f"{rps[tag]:,.0f} ({spread})",
                          f"{statistics.median(r['p50'] for r in runs):.2f}",
                          f"{statistics.median(r['p99'] for r in runs):.2f}", str(sum(r["errors"] for r in runs)),
                          ratio)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
