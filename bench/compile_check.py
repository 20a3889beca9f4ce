"""Does torch.compile speed up a family's training step on this machine? Eager against compiled, side by side.

    .venv/bin/python bench/compile_check.py resnet 320     # family, batch (ResNet-9: 256 + 64 outliers)

One training step is forward, cross-entropy, backward and an SGD step, channels_last and bf16 autocast as
`pipeline train` runs it on a CPU with native bf16, on random images. Prints the compile (warm-up) time and
the median step of each, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_budget import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family")
    parser.add_argument("batch", type=int)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    from pipeline.config import resolve_config
    from pipeline.models import build_model

    config = resolve_config(args.family, "cpu")
    images = torch.rand(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 4, (args.batch,))

    def make() -> nn.Module:
        torch.manual_seed(0)
        return build_model(config.model.arch, 4, **config.model.args).to(memory_format=torch.channels_last).train()

    def run(model: nn.Module, label: str, warm: int = 3) -> float:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        times, start = [], time.perf_counter()
        for i in range(warm + args.steps):
            began = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i == warm - 1:
                print(f"{label}: first {warm} steps (compiling) {time.perf_counter() - start:.1f} s", flush=True)
            elif i >= warm:
                times.append(time.perf_counter() - began)
        step = statistics.median(times)
        print(f"{label}: median step {step * 1000:.0f} ms, {args.batch / step:.0f} images/s", flush=True)
        return step

    eager = run(make(), "eager")
    compiled = run(torch.compile(make()), "compiled")
    print(f"{args.family}, batch {args.batch}: compiled step / eager step = {compiled / eager:.2f}")
    print(machine())


if __name__ == "__main__":
    main()
