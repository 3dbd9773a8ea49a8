"""Small constant tensors (indices, windows, normalisation values) copied to a device once, not on every slice or
chunk: a copy from the host waits for the device's queue (host_syncs.py)."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1024)
def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a tensor on `device`, made once per distinct (values, dtype, device). A normal tensor even when
    first asked for inside inference mode, so that training can use it after a prediction made it."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)
