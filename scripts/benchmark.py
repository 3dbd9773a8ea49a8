#!/usr/bin/env python3
"""Benchmark: RFMedSAM 2 against its nnU-Net baseline, in one run, on the same cases and machine.

Measures, for every SAM 2 input size asked for:
- prediction time per case with nnU-Net's own predictor (preprocessing, sliding window with the trainers'
  test-time mirroring, export): stage 1 (= the nnU-Net baseline) and the cascade (stage 1 + stage 2);
- one training step (forward, backward, optimizer) of stage 1 and of stage 2 at the planned patch and batch;
- peak resident memory (RSS above the process's level before the phase) and, on CUDA, peak allocated VRAM.
With `--ct D H W`, also the refiner alone on the real abdominal CT (12 organs, resampled to D x H x W),
as the multi-organ case of the paper.

Networks have random weights: time and memory do not depend on the weights' values. Prints a table and
writes JSON. This is a benchmark, not a test: figures vary with the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nnunetv2_rfmedsam.raw_dataset import (REPO_ROOT, hippocampus_source, list_cases, split_holdout,  # noqa: E402
                                           write_raw_dataset)

DATASET_ID, DATASET_NAME, PLANS = 4, "Dataset004_Hippocampus", "nnUNetRFMedSAM2Plans"
ABDOMEN_CT = REPO_ROOT.parent / "shared" / "data" / "AbdomenCT_example"


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak RSS (sampled every 5 ms) above the level at entry, and peak CUDA allocation."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_rss = 0
        self.peak_vram = None

    def __enter__(self):
        self._start = resident_bytes()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self):
        while self._running:
            self.peak_rss = max(self.peak_rss, resident_bytes() - self._start)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_vram = torch.cuda.max_memory_allocated()
        self._running = False
        self._thread.join()


@contextmanager
def timed(results: list):
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    results.append(time.perf_counter() - start)


def prepare_workspace(root: Path, num_cases: int, image_size: int) -> tuple[Path, list[str]]:
    """Plan and preprocess a small raw dataset (the fingerprint needs a few cases); returns raw dir and test cases."""
    source = hippocampus_source()
    train, test = split_holdout(list_cases(source), 6, num_cases)
    raw = write_raw_dataset(source, root / "raw" / DATASET_NAME, train, test)
    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
               nnUNet_results=str(root / "res"))
    subprocess.run(["nnUNetv2_rfmedsam_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres",
                    "-np", "1", "-npfp", "1", "--no_pbar", "--sam2-image-size", str(image_size)],
                   env=env, check=True, capture_output=True)
    return raw, test


def build(plans: dict, dataset_json: dict, configuration: str, device: torch.device):
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_rfmedsam.trainers import nnUNetTrainerRFMedSAM2, nnUNetTrainerRFPrompt
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    trainer = nnUNetTrainerRFMedSAM2 if configuration == "3d_rfmedsam2" else nnUNetTrainerRFPrompt
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = trainer.build_network_architecture(plans_manager, configuration_manager, num_inputs, heads,
                                                 False).to(device)
    # the mirroring each trainer allows at test time, as its checkpoint would record it
    mirror_axes = (len(configuration_manager.patch_size) - 1,) if configuration == "3d_rfmedsam2" else (0, 1, 2)
    return network, plans_manager, configuration_manager, mirror_axes, trainer


def make_predictor(network, plans_manager, configuration_manager, mirror_axes, trainer, dataset_json, device):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    network.eval()
    # the predictor loads these weights before each case, as it would load a checkpoint's
    predictor.manual_initialization(network, plans_manager, configuration_manager, [network.state_dict()],
                                    dataset_json, trainer.__name__, mirror_axes)
    return predictor


def benchmark_prediction(raw: Path, cases: list[str], plans: dict, dataset_json: dict, device) -> dict:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    stage1 = make_predictor(*build(plans, dataset_json, "3d_fullres", device), dataset_json, device)
    stage2 = make_predictor(*build(plans, dataset_json, "3d_rfmedsam2", device), dataset_json, device)
    times1, times2 = [], []
    with PeakMemory(device) as memory:
        for case in cases:
            image, properties = SimpleITKIO().read_images([str(raw / "imagesTs" / f"{case}_0000.nii.gz")])
            with timed(times1):
                segmentation = stage1.predict_single_npy_array(image, properties, None, None, False)
            with timed(times2):
                stage2.predict_single_npy_array(image, properties, segmentation[None].astype(np.int16), None, False)
            print(f"  {case} {tuple(image.shape[1:])}: stage 1 {times1[-1]:.2f} s, stage 2 {times2[-1]:.2f} s",
                  flush=True)
    cascade = [a + b for a, b in zip(times1, times2)]
    return {"stage1_s_per_case": statistics.mean(times1), "stage2_s_per_case": statistics.mean(times2),
            "cascade_s_per_case": statistics.mean(cascade),
            "cascade_over_stage1": statistics.mean(cascade) / statistics.mean(times1),
            "prediction_peak_rss_mb": memory.peak_rss / 2**20,
            "prediction_peak_vram_mb": memory.peak_vram / 2**20 if memory.peak_vram else None}


def training_batch(plans_manager, configuration_manager, dataset_json, device, cascaded: bool):
    """A batch of real patches: hippocampus image crops, their labels, and for stage 2 their one-hot masks."""
    from nnunetv2_rfmedsam.raw_dataset import hippocampus_source
    import SimpleITK as sitk
    source = hippocampus_source()
    patch = configuration_manager.patch_size
    images, targets = [], []
    for case in list_cases(source)[: configuration_manager.batch_size]:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.nii.gz"))).astype(np.float32)
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz")))
        image = (image - image.mean()) / image.std()
        pad = [(0, max(0, p - s)) for p, s in zip(patch, image.shape)]
        image, label = np.pad(image, pad), np.pad(label, pad)
        centre = [s // 2 - p // 2 for s, p in zip(image.shape, patch)]
        crop = tuple(slice(c, c + p) for c, p in zip(centre, patch))
        images.append(image[crop]), targets.append(label[crop])
    data = torch.from_numpy(np.stack(images))[:, None]
    target = torch.from_numpy(np.stack(targets))[:, None].long()
    if cascaded:
        labels = plans_manager.get_label_manager(dataset_json).foreground_labels
        one_hot = torch.cat([(target == k).float() for k in labels], 1)
        data = torch.cat([data, one_hot], 1)
    return data.to(device), target.to(device)


def benchmark_training_step(plans: dict, dataset_json: dict, configuration: str, device, steps: int) -> dict:
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2_rfmedsam.trainers.passes_loss import RefinementPassesLoss
    network, plans_manager, configuration_manager, _, _ = build(plans, dataset_json, configuration, device)
    cascaded = configuration == "3d_rfmedsam2"
    data, target = training_batch(plans_manager, configuration_manager, dataset_json, device, cascaded)
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False}, {}, weight_ce=1, weight_dice=1,
                          dice_class=MemoryEfficientSoftDiceLoss)
    if cascaded:
        loss = RefinementPassesLoss(loss)
    else:  # deep supervision: nnU-Net's loss on the full-resolution output is enough for timing
        network.decoder.deep_supervision = False
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4)
    network.train()
    times = []
    with PeakMemory(device) as memory:
        for step in range(steps + 1):
            with timed(times):
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    value = loss(network(data), target)
                value.backward()
                optimizer.step()
    return {"step_s": statistics.median(times[1:]), "batch": list(data.shape),
            "peak_rss_mb": memory.peak_rss / 2**20,
            "peak_vram_mb": memory.peak_vram / 2**20 if memory.peak_vram else None}


def benchmark_ct(plans: dict, dataset_json: dict, shape: list[int], image_size: int, device) -> dict:
    """The refiner alone (sliding window + mirroring over a preprocessed volume) on the real abdominal CT."""
    import SimpleITK as sitk
    import torch.nn.functional as F
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(ABDOMEN_CT / "ct.nii.gz"))).astype(np.float32)
    organs = sitk.GetArrayFromImage(sitk.ReadImage(str(ABDOMEN_CT / "labels_btcv13_pseudo.nii.gz")))
    ct = F.interpolate(torch.from_numpy((ct - ct.mean()) / ct.std())[None, None], size=shape, mode="trilinear")[0]
    organs = F.interpolate(torch.from_numpy(organs.astype(np.float32))[None, None], size=shape, mode="nearest")[0, 0]
    num_organs = 13
    plans = json.loads(json.dumps(plans))
    configuration = plans["configurations"]["3d_rfmedsam2"]
    configuration["patch_size"] = [configuration["patch_size"][0], shape[1], shape[2]]
    configuration["architecture"]["arch_kwargs"]["image_size"] = image_size
    dataset_json = dict(dataset_json, labels={"background": 0, **{f"organ{k}": k for k in range(1, num_organs + 1)}})
    predictor = make_predictor(*build(plans, dataset_json, "3d_rfmedsam2", device), dataset_json, device)
    data = torch.cat([ct] + [(organs == k).float()[None] for k in range(1, num_organs + 1)])
    times = []
    with PeakMemory(device) as memory, timed(times), torch.no_grad():
        predictor.predict_sliding_window_return_logits(data)
    return {"shape": shape, "organs_present": int(len(np.unique(organs.numpy())) - 1), "classes": num_organs,
            "image_size": image_size, "refine_s": times[0], "peak_rss_mb": memory.peak_rss / 2**20,
            "peak_vram_mb": memory.peak_vram / 2**20 if memory.peak_vram else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3, help="held-back hippocampus cases to predict (default 3)")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 448],
                        help="SAM 2 input sizes to measure (default 224 448, which pad no Hiera window; the "
                             "planned default is 1024)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    parser.add_argument("--ct", type=int, nargs=3, metavar=("D", "H", "W"),
                        help="also refine the abdominal CT resampled to D H W (e.g. 100 512 512)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-o", type=Path, default=REPO / "benchmark_output" / "benchmark.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())

    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"},
               "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        raw, cases = prepare_workspace(Path(tmp), args.cases, args.image_sizes[0])
        base_plans = json.loads((Path(tmp) / "pre" / DATASET_NAME / f"{PLANS}.json").read_text())
        dataset_json = json.loads((raw / "dataset.json").read_text())
        for size in args.image_sizes:
            plans = json.loads(json.dumps(base_plans))
            plans["configurations"]["3d_rfmedsam2"]["architecture"]["arch_kwargs"]["image_size"] = size
            print(f"SAM 2 input size {size}: predicting {len(cases)} cases", flush=True)
            entry = benchmark_prediction(raw, cases, plans, dataset_json, device)
            print(f"SAM 2 input size {size}: training steps", flush=True)
            entry["train_stage1"] = benchmark_training_step(plans, dataset_json, "3d_fullres", device, args.steps)
            entry["train_stage2"] = benchmark_training_step(plans, dataset_json, "3d_rfmedsam2", device, args.steps)
            entry["train_step_stage2_over_stage1"] = entry["train_stage2"]["step_s"] / entry["train_stage1"]["step_s"]
            results["sizes"][str(size)] = entry
        if args.ct:
            for size in args.image_sizes:
                print(f"abdominal CT {args.ct} at input size {size}", flush=True)
                results.setdefault("ct", []).append(benchmark_ct(base_plans, dataset_json, args.ct, size, device))

    print(f"\n{results['machine']}")
    print(f"{'size':>5} {'stage1 s/case':>14} {'cascade s/case':>15} {'ratio':>6} {'train s/step 1|2':>17} "
          f"{'ratio':>6} {'pred RSS MB':>11} {'train2 RSS MB':>13} {'pred VRAM MB':>12}")
    for size, e in results["sizes"].items():
        vram = f"{e['prediction_peak_vram_mb']:.0f}" if e["prediction_peak_vram_mb"] else "-"
        print(f"{size:>5} {e['stage1_s_per_case']:14.2f} {e['cascade_s_per_case']:15.2f} {e['cascade_over_stage1']:6.1f} "
              f"{e['train_stage1']['step_s']:8.2f}|{e['train_stage2']['step_s']:<8.2f} "
              f"{e['train_step_stage2_over_stage1']:6.1f} {e['prediction_peak_rss_mb']:11.0f} "
              f"{e['train_stage2']['peak_rss_mb']:13.0f} {vram:>12}")
    for e in results.get("ct", []):
        print(f"CT {e['shape']} ({e['classes']} classes, {e['organs_present']} present) at {e['image_size']}: "
              f"refined in {e['refine_s']:.1f} s, peak RSS {e['peak_rss_mb']:.0f} MB"
              + (f", peak VRAM {e['peak_vram_mb']:.0f} MB" if e["peak_vram_mb"] else ""))
    args.o.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.o.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1))
    os.replace(temporary, args.o)
    print(f"JSON: {args.o}")


if __name__ == "__main__":
    main()
