"""Which precision SAM 2 computes in, per device, and building it without touching CUDA.

SAM 2 is trained and run by Meta under bfloat16 autocast on CUDA. GPUs before Ampere (V100, T4) have no bfloat16
arithmetic: torch emulates it, slowly, so they get float16 autocast instead, whose gradients nnU-Net's trainer
already scales (its GradScaler on CUDA). On the CPU SAM 2 runs in float32, or in bfloat16 where
RFMEDSAM2_CPU_BFLOAT16=t asks for it: on CPUs with bfloat16 instructions (AVX512-BF16, AMX) stage 2 then predicts
about twice as fast, with logits of bfloat16's precision, as on a GPU. Opt-in, because on other CPUs torch emulates
bfloat16, and because float32 is what the fidelity tests hold against sam2's own predictors.
"""
from __future__ import annotations

import contextlib
import os
from unittest import mock

import torch


CPU_BFLOAT16_VARIABLE = "RFMEDSAM2_CPU_BFLOAT16"


def sam2_compute_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of SAM 2 on `device`: bfloat16 where CUDA supports it, else float16; on the CPU bfloat16
    where RFMEDSAM2_CPU_BFLOAT16 asks for it; None (float32) otherwise."""
    if device.type == "cpu":
        asked = os.environ.get(CPU_BFLOAT16_VARIABLE, "").lower() in ("t", "true", "1")
        return torch.bfloat16 if asked else None
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def sam2_precision(device: torch.device):
    """The autocast context SAM 2 runs in on `device` (see `sam2_compute_dtype`)."""
    dtype = sam2_compute_dtype(device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def cuda_hidden():
    """While building SAM 2 (always on the CPU: nnU-Net moves the network to its device afterwards), sam2 puts its
    memory attention's RoPE tables and its position-encoding caches on "cuda" whenever CUDA exists, which opens a
    CUDA context for `-device cpu` too. Hidden, they stay on the CPU, and forward moves them to the input's device
    on first use (`RoPEAttention.forward`, `PositionEmbeddingSine._pe`)."""
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        yield
