"""Counting what would stall a GPU, on any device: reads from the device into Python, and copies of Python data
to the device, each attributed to the line of code that asked for it.

On a GPU, `.item()`, `.tolist()`, `bool(t)`, `int(t)`, `.nonzero()`, boolean-mask indexing, `.cpu()` wait until
the device has finished everything queued before them: the GPU then idles while Python catches up. A tensor made
from Python numbers with `device=` is a copy from the host, which waits for the queue too. A
`TorchFunctionMode` sees every such call whatever the device, so the count is the same on the CPU.

    with HostSyncCounter() as syncs:
        network(x)
    syncs.reads, syncs.copies, syncs.by_line()
"""
from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode

DEVICE_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
                torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
                torch.Tensor.cpu, torch.unique, torch.Tensor.unique, torch.masked_select, torch.Tensor.masked_select}
HOST_COPIES = {torch.tensor, torch.as_tensor, torch.Tensor.new_tensor}


class HostSyncCounter(TorchFunctionMode):
    """Counts reads from the device (`reads`) and copies of Python data to it (`copies`), per calling line."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _kind(func, args)
        if kind is not None:
            self.calls[(kind, _caller())] += 1
        return func(*args, **(kwargs or {}))

    @property
    def reads(self) -> int:
        return sum(n for (kind, _), n in self.calls.items() if kind == "read")

    @property
    def copies(self) -> int:
        return sum(n for (kind, _), n in self.calls.items() if kind == "copy")

    def count(self, kind: str, outside: str | None = None) -> int:
        """Calls of a kind ("read", "copy"), optionally leaving out lines in files whose path contains `outside`."""
        return sum(n for (k, line), n in self.calls.items() if k == kind and not (outside and outside in line))

    def by_line(self) -> list[tuple[str, str, int]]:
        return sorted(((kind, line, n) for (kind, line), n in self.calls.items()), key=lambda row: -row[2])


def _kind(func, args) -> str | None:
    if func in DEVICE_READS:
        return "read"
    if func is torch.Tensor.__getitem__ and _has_boolean_index(args[1]):
        return "read"  # the result's size depends on the mask's values
    if func in HOST_COPIES:
        data = args[1] if func is torch.Tensor.new_tensor else (args[0] if args else None)
        return None if isinstance(data, torch.Tensor) else "copy"
    return None


def _has_boolean_index(index) -> bool:
    indices = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _caller() -> str:
    """file:line of the innermost frame outside torch itself."""
    for frame in reversed(traceback.extract_stack()[:-2]):  # leaving out this function and the mode's
        if "/torch/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}"
    return "?"
