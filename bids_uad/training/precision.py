"""The arithmetic of the training steps: float32, or bfloat16 mixed precision where it is native.

``TrainingSettings.precision = "auto"`` runs each training step's forward pass under
``torch.autocast`` with bfloat16 when the device computes it natively — a CPU with AVX512-BF16 or
AMX-BF16 instructions (read from ``/proc/cpuinfo``), a CUDA GPU that supports it — and in float32
otherwise, where bfloat16 convolutions would be emulated and slower.  Autocast keeps the weights,
their gradients, the optimiser state and the losses in float32 (the MSE of a bfloat16 output against a
float32 target is a float32 difference); only the convolutions' inputs and outputs are rounded to
bfloat16.  Validation, calibration and scoring run in float32, so a reconstruction residual is
never rounded (bfloat16 keeps 8 significant bits, steps of 0.4 % near a signal ratio of 1: not
negligible beside residuals of a few per cent).  Measured on the standard cdae's grid (40×56×48, 32 channels, one CPU thread,
AVX512-BF16): 0.30 s per training step in float32, 0.08 s with bfloat16 (docs/models.md).
"""
from __future__ import annotations

import contextlib
import functools

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic instructions (Linux: ``/proc/cpuinfo`` flags)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def training_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The autocast dtype of the training steps on ``device`` for ``precision`` (float32: none)."""
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
    return torch.float32


def training_autocast(dtype: torch.dtype, device: torch.device | str):
    """Context of one training step's forward pass and loss: autocast to ``dtype`` unless float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
