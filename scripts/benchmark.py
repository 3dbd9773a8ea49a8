#!/usr/bin/env python3
"""Benchmark: RFMedSAM 2 against its nnU-Net baseline, in one run, on the same cases and machine.

Measures, for every SAM 2 input size asked for:
- prediction time per case with nnU-Net's own predictor (preprocessing, the trainers' default test-time
  mirroring, export): stage 1 (= the nnU-Net baseline), stage 2 as it runs now (whole volumes, each slice
  encoded once per mirror) and stage 2 through nnU-Net's sliding window (what it ran before), with the frames
  SAM 2's image encoder saw per case and its share of the time; the cascade (stage 1 + stage 2) over stage 1;
- one training step (forward, backward, optimizer) of stage 1 and of stage 2 at the planned patch and batch;
- peak resident memory (RSS above the process's level before the phase) and, on CUDA, peak allocated VRAM;
- peak memory of whole-volume refinement against the number of slices (`--depths`, a real hippocampus case
  resampled along its slice axis): it must not grow beyond the volume's own arrays.
With `--ct D H W`, also the refiner alone on the real abdominal CT (12 organs, resampled to D x H x W, 13
classes), as the multi-organ case of the paper. With `--demo DIR` (after `make demo`), the demo's trained models
on its held-back cases: time and Dice of stage 1, of the cascade on whole volumes and of the cascade through the
sliding window. On CUDA, `--compile` adds torch.compile'd rows; SAM 2 runs in bfloat16 there.

Networks of the size rows have random weights: time and memory do not depend on the weights' values. Prints
tables and writes JSON. This is a benchmark, not a test: figures vary with the machine and its load.
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


def peak_resident_bytes() -> int:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: a spawned child's starts at its parent's peak,
    which Linux carries over the fork and exec of multiprocessing's spawn."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


def reset_peak_resident() -> None:
    """Restart VmHWM from the current RSS (Linux's clear_refs), so that it measures one phase."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


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
    from nnunetv2_rfmedsam.trainers.rfmedsam2_trainer import stage2_mirror_axes
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    trainer = nnUNetTrainerRFMedSAM2 if configuration == "3d_rfmedsam2" else nnUNetTrainerRFPrompt
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = trainer.build_network_architecture(plans_manager, configuration_manager, num_inputs, heads,
                                                 False).to(device)
    # the mirroring each trainer allows at test time, as its checkpoint would record it
    mirror_axes = stage2_mirror_axes(configuration_manager.network_arch_init_kwargs,
                                     len(configuration_manager.patch_size)) if configuration == "3d_rfmedsam2" \
        else (0, 1, 2)
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


class EncoderMeter:
    """Frames through SAM 2's image encoder and the time spent there, on one network."""

    def __init__(self, network):
        self.frames, self.seconds = 0, 0.0
        forward_image = network.sam.forward_image

        def metered(frames):
            start = time.perf_counter()
            out = forward_image(frames)
            if frames.is_cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            self.frames += frames.shape[0]
            return out

        network.sam.forward_image = metered


def benchmark_prediction(raw: Path, cases: list[str], plans: dict, dataset_json: dict, device) -> dict:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    stage1 = make_predictor(*build(plans, dataset_json, "3d_fullres", device), dataset_json, device)
    parts = build(plans, dataset_json, "3d_rfmedsam2", device)
    network2, stage2 = parts[0], make_predictor(*parts, dataset_json, device)
    meter = EncoderMeter(network2)
    inputs = [SimpleITKIO().read_images([str(raw / "imagesTs" / f"{case}_0000.nii.gz")]) for case in cases]
    entry, segmentations = {"cases": len(cases)}, []
    with PeakMemory(device) as memory:
        times = []
        for image, properties in inputs:
            with timed(times):
                segmentations.append(stage1.predict_single_npy_array(image, properties, None, None, False))
    entry["stage1"] = {"s_per_case": statistics.mean(times), "peak_rss_mb": memory.peak_rss / 2**20,
                       "peak_vram_mb": memory.peak_vram / 2**20 if memory.peak_vram else None}
    for mode, whole in (("whole_volume", True), ("windowed", False)):
        network2.predicts_whole_volumes = whole
        meter.frames, meter.seconds, times = 0, 0.0, []
        with PeakMemory(device) as memory:
            for (image, properties), segmentation in zip(inputs, segmentations):
                with timed(times):
                    stage2.predict_single_npy_array(image, properties, segmentation[None].astype(np.int16), None,
                                                    False)
        entry[f"stage2_{mode}"] = {
            "s_per_case": statistics.mean(times), "encoder_frames_per_case": meter.frames / len(cases),
            "encoder_share": meter.seconds / sum(times), "peak_rss_mb": memory.peak_rss / 2**20,
            "peak_vram_mb": memory.peak_vram / 2**20 if memory.peak_vram else None}
        entry[f"cascade_{mode}_over_stage1"] = (entry["stage1"]["s_per_case"] + statistics.mean(times)) / \
            entry["stage1"]["s_per_case"]
        entry[f"stage2_{mode}_over_stage1"] = statistics.mean(times) / entry["stage1"]["s_per_case"]
        print(f"  stage 2 {mode}: {statistics.mean(times):.2f} s per case, {meter.frames / len(cases):.0f} "
              f"encoder frames per case", flush=True)
    entry["slices_per_case"] = statistics.mean(image.shape[1] for image, _ in inputs)
    network2.predicts_whole_volumes = True
    return entry


def benchmark_depth_memory(plans: dict, dataset_json: dict, depths: list[int], image_size: int, device) -> list:
    """Peak memory of whole-volume refinement through nnU-Net's predictor (with its mirroring) on a real
    hippocampus case resampled along its slice axis to each depth, each depth in a fresh process that differs in
    nothing else: the process's peak RSS, and the peak while predicting above the RSS just before it, against the
    size of the volume's own arrays (input and logits; nnU-Net's mirroring holds about two inputs and three
    logits at once)."""
    import multiprocessing
    rows = []
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for depth in depths:
            row = pool.apply(_depth_memory_child, (plans, dataset_json, depth, image_size, str(device)))
            rows.append(row)
            print(f"  {depth} slices: {row['refine_s']:.1f} s, process peak RSS {row['process_peak_rss_mb']:.0f} MB "
                  f"(+{row['peak_rss_mb']:.0f} MB while predicting)", flush=True)
    return rows


def _depth_memory_child(plans: dict, dataset_json: dict, depth: int, image_size: int, device_name: str) -> dict:
    import SimpleITK as sitk
    import torch.nn.functional as F
    device = torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())
    source = hippocampus_source()
    case = list_cases(source)[0]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.nii.gz"))).astype(np.float32)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz"))).astype(np.float32)
    plans = json.loads(json.dumps(plans))
    plans["configurations"]["3d_rfmedsam2"]["architecture"]["arch_kwargs"]["image_size"] = image_size
    predictor = make_predictor(*build(plans, dataset_json, "3d_rfmedsam2", device), dataset_json, device)
    shape = (depth, *image.shape[1:])
    volume = F.interpolate(torch.from_numpy((image - image.mean()) / image.std())[None, None], size=shape,
                           mode="trilinear")[0]
    labels = F.interpolate(torch.from_numpy(label)[None, None], size=shape, mode="nearest")[0, 0]
    data = torch.cat([volume, (labels == 1).float()[None], (labels == 2).float()[None]])
    arrays = (2 * data.numel() + 3 * 3 * labels.numel()) * 4
    built_peak = peak_resident_bytes()
    reset_peak_resident()
    before = resident_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        vram_before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.no_grad():
        predictor.predict_sliding_window_return_logits(data)
    seconds = time.perf_counter() - start
    peak = peak_resident_bytes()
    return {"slices": depth, "shape": list(shape), "image_size": image_size, "refine_s": seconds,
            "peak_rss_mb": (peak - before) / 2**20, "process_peak_rss_mb": max(peak, built_peak) / 2**20,
            "predict_peak_rss_mb": peak / 2**20,
            "volume_arrays_mb": arrays / 2**20,
            "peak_vram_mb": (torch.cuda.max_memory_allocated() - vram_before) / 2**20 if device.type == "cuda"
            else None}


@contextmanager
def cpu_bfloat16(enabled: bool):
    """SAM 2 in bfloat16 on the CPU while `enabled` (precision.py's switch)."""
    from nnunetv2_rfmedsam.model.precision import CPU_BFLOAT16_VARIABLE
    before = os.environ.get(CPU_BFLOAT16_VARIABLE)
    if enabled:
        os.environ[CPU_BFLOAT16_VARIABLE] = "t"
    try:
        yield
    finally:
        os.environ.pop(CPU_BFLOAT16_VARIABLE, None)
        if before is not None:
            os.environ[CPU_BFLOAT16_VARIABLE] = before


def benchmark_trained_models(demo: Path, device) -> dict:
    """The demo's trained stage 1 (fold all) and stage 2 (fold 0) on its held-back cases, with the trainers'
    default test-time mirroring: seconds per case and Dice per class of stage 1, the cascade on whole volumes
    and the cascade through nnU-Net's sliding window (tile step 0.5); on the CPU also the cascade on whole volumes
    with SAM 2 in bfloat16."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2_rfmedsam.evaluation.metrics import dice_score
    from nnunetv2_rfmedsam.registration import EXT_TRAINER_FOLDER
    from nnunetv2_rfmedsam.model.network import RFMedSAM2Network
    os.environ["nnUNet_extTrainer"] = EXT_TRAINER_FOLDER
    raw, results = demo / "nnUNet_raw" / DATASET_NAME, demo / "nnUNet_results" / DATASET_NAME

    def predictor(folder: str, fold: str):
        made = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, device=device, allow_tqdm=False,
                               perform_everything_on_device=device.type == "cuda")
        made.initialize_from_trained_model_folder(str(results / folder), (fold,), "checkpoint_final.pth")
        return made

    stage1 = predictor(f"nnUNetTrainerRFPrompt__{PLANS}__3d_fullres", "all")
    stage2 = predictor(f"nnUNetTrainerRFMedSAM2__{PLANS}__3d_rfmedsam2", "0")
    refiner = stage2.network._orig_mod if hasattr(stage2.network, "_orig_mod") else stage2.network
    assert isinstance(refiner, RFMedSAM2Network)
    cases = sorted(f.name[:-len(".nii.gz")] for f in (raw / "labelsTs").glob("*.nii.gz"))
    # on the CPU also SAM 2 in bfloat16 (RFMEDSAM2_CPU_BFLOAT16, precision.py), as it runs on a GPU
    bfloat16 = ("cascade_whole_volume_bf16",) if device.type == "cpu" else ()
    methods = ("stage1", "cascade_whole_volume", "cascade_windowed", *bfloat16)
    times = {m: [] for m in methods}
    dice = {m: {1: [], 2: []} for m in methods}
    for case in cases:
        image, properties = SimpleITKIO().read_images([str(raw / "imagesTs" / f"{case}_0000.nii.gz")])
        reference, _ = SimpleITKIO().read_seg(str(raw / "labelsTs" / f"{case}.nii.gz"))
        with timed(times["stage1"]):
            segmentation = stage1.predict_single_npy_array(image, properties, None, None, False)
        outputs = {"stage1": segmentation}
        for method in methods[1:]:
            refiner.predicts_whole_volumes = method != "cascade_windowed"
            with cpu_bfloat16(method in bfloat16), timed(times[method]):
                outputs[method] = stage2.predict_single_npy_array(image, properties,
                                                                  segmentation[None].astype(np.int16), None, False)
        for method, output in outputs.items():
            for label in (1, 2):
                dice[method][label].append(dice_score(reference[0] == label, output == label))
        print(f"  {case}: " + ", ".join(f"{m} {times[m][-1]:.1f} s" for m in methods), flush=True)
    refiner.predicts_whole_volumes = True
    summary = {m: {"s_per_case": statistics.mean(times[m]),
                   "dice": {str(k): statistics.mean(v) for k, v in dice[m].items()},
                   "mean_dice": statistics.mean(statistics.mean(v) for v in dice[m].values())} for m in methods}
    summary["cases"] = cases
    summary["stage2_whole_over_windowed"] = summary["cascade_whole_volume"]["s_per_case"] / \
        summary["cascade_windowed"]["s_per_case"]
    return summary


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


def benchmark_ct(plans: dict, dataset_json: dict, shape: list[int], image_size: int, device,
                 compile_network: bool = False) -> dict:
    """The refiner alone (whole volume, the trainer's mirroring) on the real abdominal CT, 13 classes."""
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
    parts = list(build(plans, dataset_json, "3d_rfmedsam2", device))
    meter = EncoderMeter(parts[0])
    if compile_network:
        parts[0] = torch.compile(parts[0])
    predictor = make_predictor(*parts, dataset_json, device)
    data = torch.cat([ct] + [(organs == k).float()[None] for k in range(1, num_organs + 1)])
    times = []
    with PeakMemory(device) as memory, timed(times), torch.no_grad():
        predictor.predict_sliding_window_return_logits(data)
    return {"shape": shape, "organs_present": int(len(np.unique(organs.numpy())) - 1), "classes": num_organs,
            "image_size": image_size, "compiled": compile_network, "refine_s": times[0],
            "encoder_frames": meter.frames, "encoder_share": meter.seconds / times[0],
            "peak_rss_mb": memory.peak_rss / 2**20,
            "peak_vram_mb": memory.peak_vram / 2**20 if memory.peak_vram else None}


def mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_tables(results: dict) -> None:
    print(f"\n{results['machine']}")
    print("\nprediction, nnU-Net's predictor with the trainers' default test-time mirroring (random weights)")
    print(f"{'size':>5} {'stage1 s':>9} {'stage2 s':>9} {'windowed s':>11} {'cascade/st1':>12} {'windowed':>9} "
          f"{'enc frames':>11} {'windowed':>9} {'enc share':>10} {'RSS MB':>7} {'VRAM MB':>8}")
    for size, e in results["sizes"].items():
        whole, windowed = e["stage2_whole_volume"], e["stage2_windowed"]
        print(f"{size:>5} {e['stage1']['s_per_case']:9.2f} {whole['s_per_case']:9.2f} {windowed['s_per_case']:11.2f} "
              f"{e['cascade_whole_volume_over_stage1']:12.2f} {e['cascade_windowed_over_stage1']:9.2f} "
              f"{whole['encoder_frames_per_case']:11.0f} {windowed['encoder_frames_per_case']:9.0f} "
              f"{whole['encoder_share']:10.2f} {whole['peak_rss_mb']:7.0f} {mb(whole['peak_vram_mb']):>8}")
    print(f"(slices per case: {next(iter(results['sizes'].values()))['slices_per_case']:.1f}; cascade = stage 1 + "
          f"stage 2; enc frames: SAM 2 image-encoder frames per case)")
    print("\ntraining step at the planned patch and batch")
    for size, e in results["sizes"].items():
        print(f"{size:>5} stage 1 {e['train_stage1']['step_s']:.2f} s, stage 2 {e['train_stage2']['step_s']:.2f} s "
              f"(x{e['train_step_stage2_over_stage1']:.1f}), stage 2 peak RSS {e['train_stage2']['peak_rss_mb']:.0f} MB"
              f", VRAM {mb(e['train_stage2']['peak_vram_mb'])} MB")
    if results.get("depths"):
        print("\nwhole-volume refinement against the number of slices (peak above the process's level)")
        for e in results["depths"]:
            print(f"  {e['slices']:>4} slices {e['shape']}: {e['refine_s']:.1f} s, process peak RSS "
                  f"{e['process_peak_rss_mb']:.0f} MB (+{e['peak_rss_mb']:.0f} MB while predicting; volume arrays "
                  f"{e['volume_arrays_mb']:.0f} MB), VRAM {mb(e['peak_vram_mb'])} MB")
    for e in results.get("ct", []):
        print(f"CT {e['shape']} ({e['classes']} classes, {e['organs_present']} present) at {e['image_size']}"
              f"{' compiled' if e['compiled'] else ''}: refined in {e['refine_s']:.1f} s, "
              f"{e['encoder_frames']} encoder frames ({e['encoder_share']:.0%} of the time), peak RSS "
              f"{e['peak_rss_mb']:.0f} MB, VRAM {mb(e['peak_vram_mb'])} MB")
    if results.get("demo"):
        d = results["demo"]
        print(f"\nthe demo's trained models, {len(d['cases'])} held-back cases, default test-time mirroring")
        stage1 = d["stage1"]["s_per_case"]
        for method in [m for m in d if m.startswith(("stage1", "cascade_"))]:
            ratio = "" if method == "stage1" else \
                f", cascade over stage 1 {(stage1 + d[method]['s_per_case']) / stage1:.2f}x"
            print(f"  {method:<26} {d[method]['s_per_case']:6.2f} s per case{ratio}, Dice "
                  f"{' / '.join(f'{v:.4f}' for v in d[method]['dice'].values())} (mean {d[method]['mean_dice']:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3, help="held-back hippocampus cases to predict (default 3)")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224],
                        help="SAM 2 input sizes to measure (default 224, which pads no Hiera window; the "
                             "planned default is 1024)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    parser.add_argument("--depths", type=int, nargs="*", default=[50, 200],
                        help="slice counts for the memory-against-depth rows (default 50 200; none to skip)")
    parser.add_argument("--ct", type=int, nargs=3, metavar=("D", "H", "W"),
                        help="also refine the abdominal CT resampled to D H W (e.g. 100 512 512)")
    parser.add_argument("--ct-image-sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--demo", type=Path, help="the demo's workspace (make demo): time and Dice of its models")
    parser.add_argument("--compile", action="store_true", help="CUDA: also measure torch.compile'd CT rows")
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
        if args.depths:
            print(f"memory against depth at input size {args.image_sizes[0]}", flush=True)
            results["depths"] = benchmark_depth_memory(base_plans, dataset_json, args.depths, args.image_sizes[0],
                                                       device)
        if args.ct:
            for size in args.ct_image_sizes:
                for compiled in ([False, True] if args.compile and device.type == "cuda" else [False]):
                    print(f"abdominal CT {args.ct} at input size {size}{' compiled' if compiled else ''}", flush=True)
                    results.setdefault("ct", []).append(benchmark_ct(base_plans, dataset_json, args.ct, size, device,
                                                                     compiled))
    if args.demo:
        print(f"the demo's trained models ({args.demo})", flush=True)
        results["demo"] = benchmark_trained_models(args.demo.resolve(), device)
    print_tables(results)
    args.o.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.o.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1))
    os.replace(temporary, args.o)
    print(f"JSON: {args.o}")


if __name__ == "__main__":
    main()
