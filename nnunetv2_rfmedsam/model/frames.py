"""nnU-Net's normalised image slices -> SAM 2 frames.

SAM 2 was trained on RGB frames scaled to [0, 1] and then normalised with ImageNet's mean and std
(`sam2/utils/misc.py`, `sam2/utils/transforms.py::SAM2Transforms`, and Meta's training transforms
`ToTensorAPI` + `NormalizeAPI`): a frame spans about -2.12 (black) .. +2.64 (white). nnU-Net's
normalised intensities are not on that scale (z-scored MRI reaches 5-10 standard deviations; CT is
in units of the foreground's std), so each image channel gets a window (low, high) in nnU-Net's
normalised units that is mapped to [0, 1] and clipped, before the channels become RGB.

The windows are written into the plans by the planner (`SAM2Settings.intensity_windows`, from
`default_intensity_windows`), so training and inference map intensities identically.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from nnunetv2_rfmedsam.model.device_constants import device_constant

# sam2/utils/misc.py and SAM2Transforms
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-image z-score (nnU-Net's ZScoreNormalization, MRI and unknown channels): mean -> mid grey, 3 std below
# -> black, 3 std above -> white. The z-scored intensities of a scan are mostly within +-3 std (on all 200
# Dataset004_Hippocampus cases 99.92 % of the voxels and every labelled voxel are; hippocampus_004 has 41
# of 71136 voxels above), so contrast is kept for the bulk; what lies beyond (bright vessels, fat,
# artefacts; 5-10 std in some MRI) is clipped to white or black. A narrower window would clip tissue, a
# wider one would spend SAM 2's grey levels on a few outliers.
ZSCORE_WINDOW = (-3.0, 3.0)
# RescaleTo01Normalization and RGBTo01Normalization already give [0, 1]
UNIT_WINDOW = (0.0, 1.0)


def intensity_window(scheme: str, properties: dict | None) -> list[float]:
    """The window (low, high), in the units nnU-Net's `scheme` produces, of one channel.

    `properties`: that channel's entry of the plans' `foreground_intensity_properties_per_channel`
    (the fingerprint's foreground statistics in raw units), needed for CT and NoNormalization."""
    if scheme == "CTNormalization":
        # exactly CTNormalization.run: clip to [percentile_00_5, percentile_99_5], subtract mean, divide by
        # max(std, eps); its clipping bounds become black and white
        std = max(float(properties["std"]), 1e-8)
        low = (float(properties["percentile_00_5"]) - float(properties["mean"])) / std
        high = (float(properties["percentile_99_5"]) - float(properties["mean"])) / std
    elif scheme == "ZScoreNormalization":
        low, high = ZSCORE_WINDOW
    elif scheme in ("RescaleTo01Normalization", "RGBTo01Normalization"):
        low, high = UNIT_WINDOW
    elif scheme == "NoNormalization":
        # raw intensities: the foreground's 0.5th and 99.5th percentiles, as CTNormalization would clip them
        low, high = float(properties["percentile_00_5"]), float(properties["percentile_99_5"])
    else:
        # a custom normaliser we know nothing about: nnU-Net's own fallback for unknown channel names is the
        # z-score, so assume roughly zero-mean, unit-variance output
        low, high = ZSCORE_WINDOW
    if not high > low:
        # a constant foreground (or NaN statistics): any window keeps it constant; give a valid one around it
        centre = low if low == low else 0.0
        low, high = centre - 0.5, centre + 0.5
    return [float(low), float(high)]


def intensity_windows_for(normalization_schemes: Sequence[str],
                          foreground_intensity_properties_per_channel: dict) -> list[list[float]]:
    """One window per image channel: channel c uses `normalization_schemes[c]` and the properties under
    key `str(c)` (nnU-Net's keys)."""
    return [intensity_window(scheme, foreground_intensity_properties_per_channel.get(str(c)))
            for c, scheme in enumerate(normalization_schemes)]


def default_intensity_windows(plans, configuration_name: str) -> list[list[float]]:
    """One window per image channel, from a configuration's `normalization_schemes` and the plans'
    `foreground_intensity_properties_per_channel`. `plans`: the plans dict or nnU-Net's PlansManager."""
    plans_dict = getattr(plans, "plans", plans)
    return intensity_windows_for(plans_dict["configurations"][configuration_name]["normalization_schemes"],
                                 plans_dict.get("foreground_intensity_properties_per_channel", {}))


def require_finite_intensities(image: torch.Tensor) -> None:
    """ValueError (one line) if the image channels hold NaN or infinite values: a window clips infinity to black or
    white, but NaN would pass through the frames into SAM 2 and every result. The check reads one flag back from
    the device (a host synchronisation): call it once per forward, not per slice."""
    finite = torch.isfinite(image)
    if not bool(finite.all()):
        bad = image.numel() - int(finite.sum())
        raise ValueError(f"image channels: {bad} of {image.numel()} voxels are not finite (NaN or infinite); SAM 2 "
                         f"needs finite intensities: check the input images")


def slices_to_sam_frames(image: torch.Tensor, size: int, windows: Sequence[Sequence[float]]) -> torch.Tensor:
    """Image channels (B, C, D, H, W) in nnU-Net's normalised units -> SAM 2 frames (B * D, 3, size, size),
    patch-major, ImageNet-normalised.

    Each channel c is mapped linearly with windows[c] = (low, high) to low -> 0, high -> 1 and clipped to
    [0, 1]; one channel becomes grey RGB, two become (c0, c1, their mean), more than three keep the first
    three. Bilinear resizing with antialias uses non-negative weights summing to 1, so frames stay in [0, 1]
    (the clamp after it only removes rounding) until the ImageNet normalisation."""
    batch, channels, depth, height, width = image.shape
    if len(windows) != channels:
        raise ValueError(f"{len(windows)} intensity windows for {channels} image channels; the plans need one "
                         f"[low, high] per channel")
    # tensors, not Python numbers: division by a Python number is a multiplication by its reciprocal on CUDA, one
    # bit away from torchvision's normalisation that sam2 uses
    bounds = device_constant(tuple((float(low), float(high)) for low, high in windows), torch.float32, image.device)
    low, high = bounds[:, 0].view(1, channels, 1, 1), bounds[:, 1].view(1, channels, 1, 1)
    slices = image.transpose(1, 2).reshape(batch * depth, channels, height, width).float()
    unit = ((slices - low) / (high - low)).clamp(0, 1)
    if channels == 1:
        rgb = unit.expand(-1, 3, -1, -1)
    elif channels == 2:
        rgb = torch.cat([unit, unit.mean(dim=1, keepdim=True)], dim=1)
    else:
        rgb = unit[:, :3]
    rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    mean = device_constant(tuple(IMAGENET_MEAN), torch.float32, rgb.device).view(1, 3, 1, 1)
    std = device_constant(tuple(IMAGENET_STD), torch.float32, rgb.device).view(1, 3, 1, 1)
    return (rgb - mean) / std
