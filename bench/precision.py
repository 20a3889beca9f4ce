"""Is bf16 autocast faster than fp32 for training on this CPU? The three default nets, side by side.

    .venv/bin/python bench/precision.py [--rounds 7]

Times one training step's forward and backward pass per image (channels_last, the CPU recipe's batch sizes,
random images), bf16 autocast and fp32 interleaved round by round, and prints the medians, their ratio and
what ``precision: auto`` picks here (``hardware.cpu_bf16_speedup``'s one-conv probe, and the rule that bf16
must be at least ``BF16_MARGIN`` faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from train_budget import machine  # noqa: E402

NETS = {  # family: (build_model arguments, the CPU recipe's batch size)
    "vgg": ({"cfg": "airbench", "widths": [64, 256, 256]}, 512),
    "resnet": ({"variant": "resnet9", "widths": [64, 128, 256]}, 256),
    "lenet": ({}, 128),
}


def step_ms_per_image(net: torch.nn.Module, batch: int, bf16: bool) -> float:
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch,))
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    for p in net.parameters():
        p.grad = None
    return (time.perf_counter() - started) / batch * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    from pipeline.hardware import BF16_MARGIN, auto_precision, cpu_bf16_speedup, cpu_has_native_bf16
    from pipeline.models import build_model

    nets = {name: (build_model(name, 4, **kwargs).to(memory_format=torch.channels_last), batch)
            for name, (kwargs, batch) in NETS.items()}
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.rounds + 1):  # the first round builds oneDNN's kernels and is dropped
        for name, (net, batch) in nets.items():
            for bf16 in (True, False):
                times.setdefault((name, bf16), []).append(step_ms_per_image(net, batch, bf16))
    print(f"{'family':8} {'batch':>5} {'bf16 ms/img':>12} {'fp32 ms/img':>12} {'bf16 speedup':>13}")
    for name, (_, batch) in nets.items():
        bf16, fp32 = (statistics.median(times[(name, b)][1:]) for b in (True, False))
        print(f"{name:8} {batch:5d} {bf16:12.3f} {fp32:12.3f} {fp32 / bf16:12.2f}x")
    print(f"bf16 units: {cpu_has_native_bf16()}; one-conv probe: bf16 at {cpu_bf16_speedup():.2f}x fp32's speed; "
          f"precision auto picks {auto_precision('cpu')} (bf16 needs >= {BF16_MARGIN}x)")
    print(f"{machine()}; {torch.get_num_threads()} threads; median of {args.rounds} rounds")


if __name__ == "__main__":
    main()
