"""What the machine can do: which profile (cpu or gpu), which precision, and why a GPU is not used."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 convolutions run about 1.8x faster than fp32 (bench/ measured)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(accelerator: str) -> str:
    """bf16-mixed where the hardware does bf16 natively, 16-mixed on older GPUs, else fp32."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        # including_emulation=False: V100/T4 "support" bf16 only by emulation, far slower than fp16.
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


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
