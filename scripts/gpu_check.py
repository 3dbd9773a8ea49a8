#!/usr/bin/env python3
"""`make gpu-check`: what a CPU cannot show, measured on a GPU in one command, printed as one table.

Rows: the refiner on the GPU against the same refiner on the CPU in float32, whose path the fidelity tests hold
to sam2's own predictors (so the GPU's agreement with sam2 follows), in float32 and in SAM 2's GPU precision;
stage 2's whole-volume prediction of a synthetic CT (slices x size x size, 13 classes, SAM 2 at its native
input 1024) with seconds per volume, peak allocated memory and host synchronisations (reads counted by
host_syncs.py, and the synchronisations CUDA itself reports under `torch.cuda.set_sync_debug_mode("warn")`); one
stage-2 training step at the same input (SAM 2 in its precision for the GPU, precision.py) with its peak memory
beside the planner's memory model (planners/training_memory.py); both with torch.compile off and on. Then it runs
the benchmark's CT rows (scripts/benchmark.py --ct), stage 1 against the cascade through nnU-Net's predictor,
unless --no-benchmark.

On a machine without a GPU it refuses in one line (exit 2). `--allow-cpu` runs the same rows on the CPU at sizes
given by the options, which is how the tests keep this script working where no GPU is.
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from nnunetv2_rfmedsam.host_syncs import HostSyncCounter  # noqa: E402
from nnunetv2_rfmedsam.model import network as network_module  # noqa: E402
from nnunetv2_rfmedsam.model.network import RFMedSAM2Network  # noqa: E402
from nnunetv2_rfmedsam.model.precision import sam2_compute_dtype  # noqa: E402
from nnunetv2_rfmedsam.planners.training_memory import estimate_training_memory  # noqa: E402
from nnunetv2_rfmedsam.raw_dataset import hippocampus_source, list_cases  # noqa: E402

NO_GPU = ("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); it measures stage 2 on a "
          "GPU: run it where there is one (or pass --allow-cpu for a dry run)")


def synthetic_ct(classes: int, depth: int, size: int, device: torch.device) -> torch.Tensor:
    """One image channel of noise and `classes` box-shaped organs over the middle slices, as stage-1 masks."""
    generator = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 1 + classes, depth, size, size)
    x[:, 0] = torch.randn(depth, size, size, generator=generator)
    step = max(1, size // (classes + 2))
    for k in range(classes):
        x[:, 1 + k, depth // 5:depth - depth // 5, k * step:(k + 1) * step, size // 4:3 * size // 4] = 1
    return x.to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_synchronisations(run, device: torch.device) -> str:
    """How many synchronisations CUDA reports while `run` runs (its sync debug mode warns on each one)."""
    if device.type != "cuda":
        return "n/a (CPU)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return str(sum("synchroniz" in str(w.message) for w in caught))


def prediction_row(net: RFMedSAM2Network, x: torch.Tensor, label: str) -> list[str]:
    device = x.device
    with torch.no_grad():
        net(x)  # warm-up: compilation, device constants
        synchronize(device)
        reset_peak(device)
        start = time.perf_counter()
        with HostSyncCounter() as syncs:
            net(x)
        synchronize(device)
        seconds = time.perf_counter() - start
        reported = cuda_synchronisations(lambda: net(x), device)
    depth = x.shape[2]
    return [label, f"{seconds:.2f} s/volume", peak_memory(device),
            f"{syncs.reads} reads, {syncs.copies} copies ({syncs.reads / depth:.2f} / {syncs.copies / depth:.2f} "
            f"per slice); CUDA reports {reported}"]


def hippocampus_case() -> torch.Tensor:
    """A real hippocampus MRI (z-scored) and its two labels as stage-1 masks: (1, 3, D, H, W)."""
    import SimpleITK as sitk
    source = hippocampus_source()
    case = list_cases(source)[0]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.nii.gz"))).astype("float32")
    label = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz"))))
    image = torch.from_numpy((image - image.mean()) / image.std())
    return torch.stack([image, (label == 1).float(), (label == 2).float()])[None]


def fidelity_row(device: torch.device, image_size: int) -> list[str]:
    """The refiner on `device` against the same refiner on the CPU in float32, the path the fidelity tests hold to
    sam2's own SAM2ImagePredictor and SAM2VideoPredictor: a real hippocampus case, 2 classes, gates open (the
    output is SAM 2's logits), on the device in float32 and in its precision for SAM 2 (precision.py)."""
    torch.manual_seed(0)
    net = RFMedSAM2Network(3, 3, model_size="tiny", image_size=image_size).eval()
    net.set_prompt_gates(1.0)
    x = hippocampus_case()
    with torch.no_grad():
        reference = net(x)
        net.to(device)
        with mock.patch.object(network_module, "sam2_precision", lambda _: contextlib.nullcontext()):
            in_float32 = net(x.to(device)).cpu()
        in_precision = net(x.to(device)).cpu()
    dtype = str(sam2_compute_dtype(device) or torch.float32).replace("torch.", "")
    differences = []
    for logits, name in ((in_float32, "float32"), (in_precision, dtype)):
        equal_labels = (logits.argmax(1) == reference.argmax(1)).float().mean()
        differences.append(f"{(logits - reference).abs().max():.1e} in {name} ({equal_labels:.4%} of labels equal)")
    return [f"fidelity: refiner here vs. on the CPU, input {image_size}", "", "",
            "max |logit difference| " + ", ".join(differences)]


def training_row(net: RFMedSAM2Network, x: torch.Tensor, label: str) -> list[str]:
    device = x.device
    net.train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        output = net(x)
        sum(p.float().mean() for p in output.passes).backward()
        optimizer.step()

    step()  # warm-up
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    net.eval()
    seconds = time.perf_counter() - start
    estimate = estimate_training_memory(net.settings, x.shape[0], net.num_foreground_classes, tuple(x.shape[-2:]))
    return [label, f"{seconds:.2f} s/step", peak_memory(device),
            f"memory model (planner's upper bound): {estimate.total / 2**30:.2f} GiB"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU where there is no GPU (dry run)")
    parser.add_argument("--classes", type=int, default=13)
    parser.add_argument("--slices", type=int, default=100, help="slices of the synthetic CT")
    parser.add_argument("--size", type=int, default=512, help="its slices' height and width")
    parser.add_argument("--image-size", type=int, default=1024, help="SAM 2's input size")
    parser.add_argument("--patch-slices", type=int, default=8, help="slices per training patch")
    parser.add_argument("--fidelity-image-size", type=int, default=256,
                        help="SAM 2's input size for the fidelity row (the CPU computes the reference)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--no-benchmark", action="store_true", help="leave out scripts/benchmark.py's CT rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(NO_GPU, file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = RFMedSAM2Network(input_channels=1 + args.classes, num_classes=args.classes + 1, model_size="tiny",
                           image_size=args.image_size, slices_per_patch=args.patch_slices).to(device).eval()
    precision = sam2_compute_dtype(device) or torch.float32
    volume = synthetic_ct(args.classes, args.slices, args.size, device)
    patch = synthetic_ct(args.classes, args.patch_slices, args.size, device)
    rows = [fidelity_row(device, args.fidelity_image_size),
            prediction_row(net, volume, f"predict {tuple(volume.shape[2:])}, {args.classes} classes"),
            training_row(net, patch, f"train step, 1 patch of {args.patch_slices} slices")]
    if not args.no_compile:
        net.compile_per_slice_step()  # as stage 2 honours nnUNet_compile=t (model/compilation.py)
        rows += [prediction_row(net, volume, "  the same, SAM 2's modules compiled"),
                 training_row(net, patch, "  the same, SAM 2's modules compiled")]
    print(f"\ngpu-check on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'the CPU (dry run)'}, "
          f"SAM 2 tiny at input {args.image_size} in {str(precision).replace('torch.', '')}:")
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    for row in [["what", "time", "peak allocated", "host synchronisations / memory model"], *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    if not args.no_benchmark:
        subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--device", device.type,
                        "--ct", str(args.slices), str(args.size), str(args.size),
                        "--ct-image-sizes", str(args.image_size), "--depths", "--cases", "3",
                        *([] if args.no_compile else ["--compile"])], check=True)


if __name__ == "__main__":
    main()
