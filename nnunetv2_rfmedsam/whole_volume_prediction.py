"""Whole-volume stage-2 prediction inside nnU-Net's own predictor.

nnU-Net's `nnUNetPredictor` (behind nnUNetv2_predict, nnUNetv2_predict_from_modelfolder, the trainers' final
validation and Python use) runs a network on sliding-window patches, every patch with every test-time mirror.
It has no hook for a network that wants the whole volume, and for the refiner patches cost twice: SAM 2's image
encoder would run on a slice once per overlapping window, and SAM 2's memory would never reach past a patch.

So the plugin wraps the predictor's `predict_sliding_window_return_logits` (once, when the first RFMedSAM2Network
is built): for a network whose `predicts_whole_volumes` is true (the refiner's default), the whole preprocessed
volume goes to the network once per test-time mirror, through the predictor's own
`_internal_maybe_mirror_and_predict` (the same mirrors and averaging as for patches); the network then walks
the slices itself, each slice encoded once (model/network.py). Every other network, and a refiner with
`predicts_whole_volumes = False` (windowed prediction, for comparisons), goes through nnU-Net's sliding window
unchanged. The step size and Gaussian weighting of the sliding window do not apply to whole volumes.

Memory: the volume's own arrays (its input, the summed logits and one mirror's logits, as nnU-Net's sliding
window holds them, in half precision as nnU-Net does) plus what the network needs for a few slices and SAM 2's
bounded memory bank.

torch.compile: see `compile_the_step_not_the_walk`.

Out of memory, as nnU-Net's sliding window does: where the predictor keeps its results on the GPU
(`perform_everything_on_device`), a `torch.OutOfMemoryError` makes it try again with the logits on the CPU; then
with fewer classes per walk (half, a quarter, ... one), each walk seeing only its classes' stage-1 masks. SAM 2
tracks each class as an object of its own, so the classes of a walk give what they give in one walk with all of
them (to float32 rounding).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

_STOCK = "_rfmedsam2_windowed_predict_sliding_window_return_logits"
# the volume's logits are kept in half precision, as nnU-Net's sliding window keeps its result buffers: half the
# memory of a 13-class CT's logits, at a resolution (0.008 at the prompt's logit 10) far below what decides a label
RESULTS_DTYPE = torch.float16


def find_refiner(network: torch.nn.Module) -> torch.nn.Module | None:
    """The refiner behind `network` (unwrapping torch.compile and DistributedDataParallel), or None."""
    from torch._dynamo import OptimizedModule
    # torch.compile's wrapper answers for its module's attributes: it is unwrapped whatever it answers
    while network is not None and (isinstance(network, OptimizedModule) or
                                   not hasattr(network, "predicts_whole_volumes")):
        inner = getattr(network, "_orig_mod", None) or getattr(network, "module", None)
        network = None if inner is network else inner
    return network


def whole_volume_network(network: torch.nn.Module) -> torch.nn.Module | None:
    """The refiner behind `network` if it predicts whole volumes, else None."""
    refiner = find_refiner(network)
    return refiner if refiner is not None and refiner.predicts_whole_volumes else None


def install() -> None:
    """Route nnU-Net's sliding-window prediction of whole-volume networks through `predict_whole_volume`."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    if hasattr(nnUNetPredictor, _STOCK):
        return
    setattr(nnUNetPredictor, _STOCK, nnUNetPredictor.predict_sliding_window_return_logits)
    nnUNetPredictor.predict_sliding_window_return_logits = _predict_sliding_window_return_logits


def _predict_sliding_window_return_logits(self, input_image: torch.Tensor):
    if whole_volume_network(self.network) is None:
        return getattr(self, _STOCK)(input_image)
    return predict_whole_volume(self, input_image)


def predict_whole_volume(predictor, input_image: torch.Tensor) -> torch.Tensor:
    """Logits (classes, *volume) of `predictor.network` on a preprocessed volume (channels, *volume), averaged
    over the predictor's test-time mirrors; on the predictor's device, or on the CPU where the predictor keeps
    its results there (`perform_everything_on_device` off)."""
    from nnunetv2.utilities.helpers import empty_cache
    if input_image.ndim != 4:
        raise ValueError(f"whole-volume prediction takes a (channels, x, y, z) volume; got shape "
                         f"{tuple(input_image.shape)}")
    compile_the_step_not_the_walk(predictor)
    predictor.network = predictor.network.to(predictor.device)
    predictor.network.eval()
    empty_cache(predictor.device)
    if predictor.verbose:
        print(f"Input shape: {tuple(input_image.shape)}; whole volume (no sliding window), mirror_axes: "
              f"{predictor.allowed_mirroring_axes if predictor.use_mirroring else None}")
    refiner = whole_volume_network(predictor.network)
    axes = predictor.allowed_mirroring_axes if predictor.use_mirroring else None
    mirrors = 2 ** len(axes) if axes else 1
    classes = input_image.shape[0] - refiner.image_channels
    # a caller that shows its own progress (the napari plugin) sets `slice_progress_callback(done, total)`
    callback = getattr(predictor, "slice_progress_callback", None)
    attempts = memory_attempts(predictor.device, predictor.perform_everything_on_device, classes)
    for number, (results_device, classes_per_walk) in enumerate(attempts):
        groups = [list(range(start, min(start + classes_per_walk, classes)))
                  for start in range(0, classes, classes_per_walk)]
        total = mirrors * input_image.shape[1] * len(groups)
        with torch.inference_mode(), tqdm(total=total, unit="slice", disable=not predictor.allow_tqdm,
                                          desc="refining slices (whole volume, every mirror)") as progress:
            done = 0

            def advance(slices: int) -> None:
                nonlocal done
                done += slices
                progress.update(slices)
                if callback is not None:
                    callback(done, total)

            refiner.slice_progress, refiner.results_device = advance, results_device
            refiner.results_dtype = RESULTS_DTYPE
            try:
                logits = _predict_in_groups(predictor, refiner, input_image, groups)
                break
            except torch.OutOfMemoryError:
                if number + 1 == len(attempts):
                    raise
                following = attempts[number + 1]
                print(f"whole-volume prediction ran out of memory; trying again with the logits on "
                      f"{following[0]} and {following[1]} of {classes} classes per walk")
                logits = None
                empty_cache(predictor.device)
            finally:
                refiner.slice_progress, refiner.results_device, refiner.results_dtype = None, None, None
    results_device = predictor.device if predictor.perform_everything_on_device else torch.device("cpu")
    logits = logits.to(results_device)
    empty_cache(predictor.device)
    return logits


def compile_the_step_not_the_walk(predictor) -> None:
    """Under `nnUNet_compile=t` nnU-Net's predictor wraps its network in torch.compile, which for the refiner would
    compile the walk through the slices (model/compilation.py). The predictor gets the refiner back instead, with
    SAM 2's per-slice modules compiled; the wrapper never ran, so nothing was compiled for it."""
    from torch._dynamo import OptimizedModule
    if isinstance(predictor.network, OptimizedModule):
        refiner = find_refiner(predictor.network)
        refiner.compile_per_slice_step()
        predictor.network = refiner


def memory_attempts(device: torch.device, perform_everything_on_device: bool,
                    classes: int) -> list[tuple[torch.device, int]]:
    """(where the logits are kept, classes per walk) to try in turn: first as the predictor asks, then, on a GPU
    whose predictor keeps results on it, with the logits on the CPU, then with half the classes per walk, a
    quarter, ... one (see the module docstring)."""
    cpu = torch.device("cpu")
    first = device if perform_everything_on_device and device.type != "cpu" else cpu
    attempts = [(first, classes)] + ([(cpu, classes)] if first != cpu else [])
    per_walk = classes
    while per_walk > 1:
        per_walk = (per_walk + 1) // 2
        attempts.append((cpu, per_walk))
    return attempts


def _predict_in_groups(predictor, refiner, input_image: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """The predictor's mirrored prediction, one walk per group of classes: each walk sees only its classes'
    stage-1 masks (the others are absent to it), and gives the logits of its classes."""
    x = input_image.to(predictor.device)[None]
    if len(groups) == 1:
        return predictor._internal_maybe_mirror_and_predict(x)[0]
    logits = None
    for group in groups:
        seen = x.clone()
        hidden = [refiner.image_channels + k for k in range(seen.shape[1] - refiner.image_channels) if k not in group]
        seen[:, hidden] = 0
        part = predictor._internal_maybe_mirror_and_predict(seen)[0]
        if logits is None:
            logits = part  # background, and classes absent from every group's masks, as any walk gives them
        channels = [1 + k for k in group]  # output channel 0 is the background
        logits[channels] = part[channels]
    return logits
