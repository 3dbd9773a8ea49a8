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
window holds them) plus what the network needs for a few slices and SAM 2's bounded memory bank.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

_STOCK = "_rfmedsam2_windowed_predict_sliding_window_return_logits"


def find_refiner(network: torch.nn.Module) -> torch.nn.Module | None:
    """The refiner behind `network` (unwrapping torch.compile and DistributedDataParallel), or None."""
    while network is not None and not hasattr(network, "predicts_whole_volumes"):
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
    predictor.network = predictor.network.to(predictor.device)
    predictor.network.eval()
    empty_cache(predictor.device)
    if predictor.verbose:
        print(f"Input shape: {tuple(input_image.shape)}; whole volume (no sliding window), mirror_axes: "
              f"{predictor.allowed_mirroring_axes if predictor.use_mirroring else None}")
    refiner = whole_volume_network(predictor.network)
    axes = predictor.allowed_mirroring_axes if predictor.use_mirroring else None
    mirrors = 2 ** len(axes) if axes else 1
    total = mirrors * input_image.shape[1]
    # a caller that shows its own progress (the napari plugin) sets `slice_progress_callback(done, total)`
    callback = getattr(predictor, "slice_progress_callback", None)
    with torch.inference_mode(), tqdm(total=total, unit="slice", desc="refining slices (whole volume, every mirror)",
                                      disable=not predictor.allow_tqdm) as progress:
        done = 0

        def advance(slices: int) -> None:
            nonlocal done
            done += slices
            progress.update(slices)
            if callback is not None:
                callback(done, total)

        refiner.slice_progress = advance
        try:
            logits = predictor._internal_maybe_mirror_and_predict(input_image.to(predictor.device)[None])[0]
        finally:
            refiner.slice_progress = None
    results_device = predictor.device if predictor.perform_everything_on_device else torch.device("cpu")
    logits = logits.to(results_device)
    empty_cache(predictor.device)
    return logits
