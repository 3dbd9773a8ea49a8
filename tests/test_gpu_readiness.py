"""GPU bugs caught on the CPU: tensors made without a device, CUDA touched for `-device cpu`, precision per device,
and SAM 2 under bfloat16 autocast (host synchronisations: test_host_syncs.py).

- Project code that makes a tensor without `device=` would make it on the CPU while the network is on a GPU. A
  TorchFunctionMode sends such tensors to 'meta' (only those the project's own lines make: sam2's are its own), so
  that mixing one with the network's tensors fails here as it would on a GPU.
- sam2 puts tables on "cuda" while it builds whenever CUDA exists: with CUDA made to look available on this
  machine without a driver, building must not touch it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import nnunetv2_rfmedsam
from nnunetv2_rfmedsam.model import precision
from nnunetv2_rfmedsam.model.network import RFMedSAM2Network

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = dict(model_size="tiny", image_size=64, adapter_width=32, refinement_passes=2, slices_per_patch=4,
                use_memory=True)
PROJECT = nnunetv2_rfmedsam.__path__[0]
GPU_CHECK = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.tensor, torch.as_tensor,
             torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye}


class ProjectTensorsToMeta(TorchFunctionMode):
    """Factories called from the project's code without `device=` make their tensor on 'meta'."""

    def __init__(self):
        super().__init__()
        self.sent: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in FACTORIES and "device" not in kwargs and not (func is torch.as_tensor and args
                                                                  and isinstance(args[0], torch.Tensor)):
            caller = traceback.extract_stack()[-2]
            if caller.filename.startswith(PROJECT):
                kwargs["device"] = "meta"
                self.sent.append(f"{caller.filename}:{caller.lineno}")
        return func(*args, **kwargs)


def network(classes: int = 2) -> RFMedSAM2Network:
    torch.manual_seed(0)
    return RFMedSAM2Network(input_channels=1 + classes, num_classes=classes + 1, **SETTINGS)


def volume(classes: int = 2, depth: int = 6) -> torch.Tensor:
    x = torch.zeros(1, 1 + classes, depth, 20, 24)
    x[:, 0] = torch.randn(depth, 20, 24, generator=torch.Generator().manual_seed(0))
    for k in range(classes):
        x[:, 1 + k, 1:depth - 1, 2 + 3 * k:6 + 3 * k, 3:15] = 1
    return x


def training_step(net: RFMedSAM2Network, x: torch.Tensor) -> torch.Tensor:
    net.train()
    target = (x[:, 1:2] + 2 * x[:, 2:3]).clamp(max=2)
    net.set_click_targets(target)
    output = net(x)
    # the object scores too: the object-score head trains on them (the trainer's presence loss)
    loss = sum(logits.float().square().mean() for logits in output.passes) + \
        sum(scores.float().square().mean() for scores in output.object_scores)
    loss.backward()
    return loss


def test_project_code_makes_no_tensor_without_a_device():
    net = network()
    with ProjectTensorsToMeta() as mode:
        with torch.no_grad():
            net.eval()(volume())
        training_step(net, volume())
    assert mode.sent == []


def test_the_meta_mode_catches_a_tensor_made_without_a_device(monkeypatch):
    """The check above can fail: a constant made without `device=` in the project's code breaks the forward."""
    from nnunetv2_rfmedsam.model import prompts
    monkeypatch.setattr(prompts.ObjectPrompts, "slice_points", _slice_points_without_device)
    with ProjectTensorsToMeta() as mode, pytest.raises((RuntimeError, NotImplementedError)):
        with torch.no_grad():
            network().eval()(volume())
    assert mode.sent


def _slice_points_without_device(self, slice_index):
    boxed = (self.present if self.boxed is None else self.boxed)[:, slice_index, None]
    labels = torch.where(boxed, torch.tensor([2, 3]), -1)  # the bug: a constant on the default device
    return self.boxes[:, slice_index].reshape(-1, 2, 2).float(), labels


def test_building_sam2_touches_no_cuda_where_cuda_exists(monkeypatch):
    """With CUDA made to look available (this machine has no driver, so any CUDA tensor would fail), the network
    builds, and every tensor it holds, sam2's RoPE tables included, is on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    net = network()
    assert {p.device.type for p in net.state_dict().values()} == {"cpu"}
    rope = [m.freqs_cis for m in net.modules() if hasattr(m, "freqs_cis")]
    assert rope and {t.device.type for t in rope} == {"cpu"}


def test_precision_follows_the_device(monkeypatch):
    monkeypatch.delenv(precision.CPU_BFLOAT16_VARIABLE, raising=False)
    assert precision.sam2_compute_dtype(torch.device("cpu")) is None
    monkeypatch.setenv(precision.CPU_BFLOAT16_VARIABLE, "t")
    assert precision.sam2_compute_dtype(torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.sam2_compute_dtype(torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # V100, T4
    assert precision.sam2_compute_dtype(torch.device("cuda")) is torch.float16


def test_prediction_and_training_in_cpu_bfloat16(monkeypatch):
    """SAM 2 in reduced precision, as on a GPU (RFMEDSAM2_CPU_BFLOAT16=t): it does run in bfloat16 (the logits
    differ from float32's), the logits stay float32 and finite, and a training step gives finite gradients to every
    trainable parameter."""
    net = network()
    x = volume()
    with torch.no_grad():
        in_float32 = net.eval()(x)
    monkeypatch.setenv(precision.CPU_BFLOAT16_VARIABLE, "t")
    with torch.no_grad():
        logits = net.eval()(x)
    training_step(net, x)
    assert logits.dtype == torch.float32 and logits.shape == (1, 3, *x.shape[2:])
    assert torch.isfinite(logits).all() and not torch.equal(logits, in_float32)
    gradients = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in gradients)


def test_gpu_check_refuses_in_one_line_without_a_gpu():
    proc = subprocess.run([sys.executable, str(GPU_CHECK)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("gpu-check: no CUDA GPU on this machine")
    assert proc.stdout == ""


def test_gpu_check_dry_run_prints_its_table_on_the_cpu():
    """The rows `make gpu-check` measures on a GPU, at a tiny size on the CPU, so that the script keeps working
    where no GPU is to run it."""
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--allow-cpu", "--classes", "2", "--slices", "6",
                           "--size", "32", "--image-size", "64", "--patch-slices", "2", "--no-compile",
                           "--fidelity-image-size", "64",
                           "--no-benchmark"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.splitlines()
    assert any(line.startswith("predict (6, 32, 32), 2 classes") and "2 reads" in line for line in table), table
    # on the CPU the row compares the CPU with itself
    assert any(line.startswith("fidelity: refiner here vs. on the CPU") and
               "0.0e+00 in float32 (100.0000% of labels equal)" in line for line in table), table
    assert any(line.startswith("train step, 1 patch of 2 slices") and "memory model" in line and "GiB" in line
               for line in table), table
