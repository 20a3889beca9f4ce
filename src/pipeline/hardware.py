"""What the machine can do: which profile (cpu or gpu), which precision, and why a GPU is not used."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Optional

import torch


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the units that bf16 autocast can use on a CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# bf16 is chosen on a CPU only when it is at least this much faster: a tie goes to fp32, which is exact.
BF16_MARGIN = 1.1


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(rounds: int = 7) -> float:
    """How many times faster a 3x3 convolution's forward and backward pass runs under bf16 autocast than in
    fp32 on this CPU (the fastest of interleaved rounds, about half a second in all).

    Having the units is not enough: on a 2-core AMD EPYC with AVX512-BF16, bf16 trained about 1.8x faster,
    but on a 2-core Intel Xeon with AVX512-BF16 and no AMX, bf16 was 25-30% *slower* than fp32 for all three
    families (docs/benchmarks.md), so the choice is measured, not read from the flags.

    The fastest round, not the median: another busy process on the cores stalls bf16 (AMX) steps far more
    than fp32 ones. On a 2-core Xeon with AMX, idle, both read 1.8-2.2; with the other core busy the
    median read 0.21-0.24 in 2 of 6 probes (bf16 steps of 370 ms against 8) and picked fp32 for a whole
    training run, while the minimum read 1.4-3.1 in 5 of the 6."""
    import time

    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(32, 64, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()

    def step(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(x)
        out.float().sum().backward()
        return time.perf_counter() - started

    step(True), step(False)  # oneDNN builds its kernels on the first call
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for bf16 in (True, False):
            times[bf16].append(step(bf16))
    return min(times[False]) / min(times[True])


def choose_cpu_precision(has_units: bool, speedup: float) -> str:
    """bf16-mixed where the CPU has bf16 units and they were measured at least BF16_MARGIN faster, else 32-true."""
    return "bf16-mixed" if has_units and speedup >= BF16_MARGIN else "32-true"


def cpu_precision_note() -> str:
    """What the run's log says about a CPU precision chosen by ``auto``: the measured bf16 speed, when the CPU
    has bf16 units ('' otherwise)."""
    if torch.cuda.is_available() or not cpu_has_native_bf16():
        return ""
    return f" (bf16 autocast measured at {cpu_bf16_speedup():.2f}x fp32's speed here)"


def auto_precision(accelerator: str) -> str:
    """bf16-mixed where the hardware does bf16 natively (and, on a CPU, faster than fp32), 16-mixed on older
    GPUs, else fp32."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        # including_emulation=False: V100/T4 "support" bf16 only by emulation, far slower than fp16.
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    if not cpu_has_native_bf16():
        return "32-true"
    return choose_cpu_precision(True, cpu_bf16_speedup())


def unusable_gpu() -> Optional[str]:
    """A sentence when an NVIDIA GPU is present but torch cannot use CUDA (e.g. the driver is older than
    torch's CUDA build), so that ``--profile auto`` does not silently train the CPU recipe."""
    if torch.cuda.is_available():
        return None
    if not (Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi")):
        return None
    build = torch.version.cuda or "none (a CPU-only torch)"
    return (f"An NVIDIA GPU is present but torch {torch.__version__} cannot use it (torch's CUDA build: {build}); "
            "check `nvidia-smi` for the driver's CUDA version. Training on the CPU recipe.")


def choose_profile(name: str) -> str:
    """``auto`` -> ``gpu`` when CUDA works, else ``cpu``; ``cpu`` and ``gpu`` as given."""
    if name != "auto":
        return name
    return "gpu" if torch.cuda.is_available() else "cpu"
