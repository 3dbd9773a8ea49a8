"""nnU-Net's normalised intensities -> SAM 2 frames: windows, ImageNet scaling, the planner's defaults."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET_NAME, PLANS
from nnunetv2_rfmedsam.model.frames import (IMAGENET_MEAN, IMAGENET_STD, ZSCORE_WINDOW, default_intensity_windows,
                                            intensity_window, slices_to_sam_frames)
from nnunetv2_rfmedsam.planners.rfmedsam2_planner import RFMedSAM2PlansMixin, rfmedsam2_configuration
from nnunetv2_rfmedsam.raw_dataset import abdomen_ct_source, hippocampus_source, list_cases
from nnunetv2_rfmedsam.settings import SAM2Settings

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
BLACK = -MEAN / STD          # SAM 2's pixel 0 after its normalisation: about (-2.12, -2.04, -1.80)
WHITE = (1 - MEAN) / STD     # pixel 1: about (2.25, 2.43, 2.64)


def constant(value, shape=(1, 1, 2, 5, 7)):
    return torch.full(shape, float(value))


def test_window_ends_map_to_imagenet_black_and_white():
    window = [[-1.5, 4.0]]
    for value, expected in ((-1.5, BLACK), (4.0, WHITE), (-100.0, BLACK), (100.0, WHITE),
                            (1.25, (0.5 - MEAN) / STD)):
        frames = slices_to_sam_frames(constant(value), 16, window)
        assert frames.shape == (2, 3, 16, 16)
        torch.testing.assert_close(frames, expected.expand_as(frames), msg=f"value {value}")


def test_channels_become_rgb_each_with_its_own_window():
    # two channels: (c0, c1, mean); c0 at its low end, c1 at its high end
    image = torch.cat([constant(10.0), constant(-1.0)], dim=1)
    frames = slices_to_sam_frames(image, 8, [[10.0, 20.0], [-3.0, -1.0]])
    torch.testing.assert_close(frames, ((torch.tensor([0.0, 1.0, 0.5]).view(1, 3, 1, 1) - MEAN) / STD).expand_as(frames))
    # more than three channels: the first three, the fourth ignored
    image = torch.cat([constant(0.0), constant(1.0), constant(2.0), constant(99.0)], dim=1)
    frames = slices_to_sam_frames(image, 8, [[0.0, 1.0], [0.0, 1.0], [0.0, 4.0], [0.0, 1.0]])
    torch.testing.assert_close(frames, ((torch.tensor([0.0, 1.0, 0.5]).view(1, 3, 1, 1) - MEAN) / STD).expand_as(frames))
    with pytest.raises(ValueError, match="one \\[low, high\\] per channel"):
        slices_to_sam_frames(image, 8, [[0.0, 1.0]])


def test_frames_are_patch_major_and_deterministic():
    image = torch.arange(2 * 3, dtype=torch.float32).view(2, 1, 3, 1, 1).expand(2, 1, 3, 4, 4).contiguous()
    frames = slices_to_sam_frames(image, 4, [[0.0, 5.0]])
    unit = (frames * STD + MEAN)[:, 0, 0, 0]
    torch.testing.assert_close(unit, torch.arange(6, dtype=torch.float32) / 5)  # frame b * D + d
    torch.testing.assert_close(slices_to_sam_frames(image, 4, [[0.0, 5.0]]), frames, rtol=0, atol=0)


def test_windows_per_normalisation_scheme():
    properties = {"mean": 40.0, "std": 20.0, "percentile_00_5": -60.0, "percentile_99_5": 200.0}
    assert intensity_window("CTNormalization", properties) == [-5.0, 8.0]
    assert intensity_window("ZScoreNormalization", None) == list(ZSCORE_WINDOW) == [-3.0, 3.0]
    assert intensity_window("RescaleTo01Normalization", None) == [0.0, 1.0]
    assert intensity_window("RGBTo01Normalization", None) == [0.0, 1.0]
    assert intensity_window("NoNormalization", properties) == [-60.0, 200.0]
    assert intensity_window("SomeCustomNormalization", properties) == [-3.0, 3.0]
    # a constant foreground still gets a valid window (the settings refuse low >= high)
    flat = {"mean": 7.0, "std": 0.0, "percentile_00_5": 7.0, "percentile_99_5": 7.0}
    low, high = intensity_window("CTNormalization", flat)
    assert low < high
    SAM2Settings(intensity_windows=[[low, high]])


def test_zscored_hippocampus_mri_falls_mostly_inside_sam2s_range():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
    source = hippocampus_source()
    case = list_cases(source)[0]
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.nii.gz")))
    normalised = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={}).run(raw.astype(np.float32))
    window = intensity_window("ZScoreNormalization", None)
    outside = (normalised < window[0]) | (normalised > window[1])
    # a few bright voxels are clipped to white (hippocampus_004: 41 of 71136 above 3 std), the rest keeps its contrast
    assert 0 < outside.mean() < 0.005
    frames = slices_to_sam_frames(torch.from_numpy(normalised)[None, None], 64, [window])
    assert frames.shape == (normalised.shape[0], 3, 64, 64)
    per_channel = frames.transpose(0, 1).reshape(3, -1)
    assert torch.all(per_channel.min(dim=1).values >= BLACK.view(3) - 1e-5)
    assert torch.all(per_channel.max(dim=1).values <= WHITE.view(3) + 1e-5)
    assert frames.min() >= -2.118 and frames.max() <= 2.641
    white = torch.isclose(frames, WHITE.expand_as(frames), atol=1e-4).all(dim=1)
    assert white.float().mean() < 0.005
    # the bulk spreads over SAM 2's range instead of being squeezed into a few grey levels
    unit = (frames * STD + MEAN)[:, 0]
    assert 0.1 < unit.std() and unit.quantile(0.99) - unit.quantile(0.01) > 0.5


def ct_fingerprint_properties(ct: np.ndarray, labels: np.ndarray) -> dict:
    """Channel 0's foreground intensity properties, computed as nnU-Net's DatasetFingerprintExtractor does."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    samples, _ = DatasetFingerprintExtractor.collect_foreground_intensities(labels[None], ct[None].astype(np.float32))
    p00_5, median, p99_5 = np.percentile(samples[0], (0.5, 50.0, 99.5))
    return {"mean": float(np.mean(samples[0])), "median": float(median), "std": float(np.std(samples[0])),
            "min": float(np.min(samples[0])), "max": float(np.max(samples[0])),
            "percentile_99_5": float(p99_5), "percentile_00_5": float(p00_5)}


def test_ct_window_maps_the_foreground_percentiles_to_black_and_white():
    """On the real abdominal CT (../shared/data, or the vendored crop around every organ: the same foreground)."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    source = abdomen_ct_source()
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "ct.nii.gz")))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labels_btcv13_pseudo.nii.gz")))
    properties = ct_fingerprint_properties(ct, labels)
    low_hu, high_hu = properties["percentile_00_5"], properties["percentile_99_5"]
    assert -300 < low_hu < 0 < high_hu < 1000  # soft-tissue organs (this CT: about -118 to 77 HU)
    plans = {"configurations": {"3d_fullres": {"normalization_schemes": ["CTNormalization"]}},
             "foreground_intensity_properties_per_channel": {"0": properties}}
    windows = default_intensity_windows(plans, "3d_fullres")
    assert windows == default_intensity_windows(PlansManager(plans), "3d_fullres")
    assert np.allclose(windows, [[(low_hu - properties["mean"]) / properties["std"],
                                  (high_hu - properties["mean"]) / properties["std"]]])

    def normalise(hu):
        return CTNormalization(intensityproperties=properties).run(np.asarray(hu, dtype=np.float32).copy())

    for hu, expected in ((low_hu, BLACK), (high_hu, WHITE), (-1024.0, BLACK), (3000.0, WHITE)):
        frames = slices_to_sam_frames(torch.from_numpy(normalise(np.full((1, 1, 1, 4, 4), hu))), 8, windows)
        torch.testing.assert_close(frames, expected.expand_as(frames), msg=f"{hu} HU")
    # the real volume, in-plane square and at its own size (no resampling): voxels at or beyond the percentiles
    # are black or white, everything between is grey
    side = min(ct.shape[1:])
    volume = ct[:, :side, :side]
    frames = slices_to_sam_frames(torch.from_numpy(normalise(volume))[None, None], side, windows)
    unit = (frames * STD + MEAN)[:, 0].numpy()
    assert np.allclose(unit[volume <= low_hu], 0, atol=1e-5)
    assert np.allclose(unit[volume >= high_hu], 1, atol=1e-5)
    between = (volume > low_hu + 1) & (volume < high_hu - 1)
    assert between.any() and np.all((unit[between] > 0) & (unit[between] < 1))


STAGE1 = {"patch_size": [40, 56, 40], "median_image_size_in_voxels": [36, 50, 35],
          "normalization_schemes": ["CTNormalization", "ZScoreNormalization"], "data_identifier": "x_3d_fullres"}
PROPERTIES = {"0": {"mean": 100.0, "std": 50.0, "percentile_00_5": -50.0, "percentile_99_5": 300.0},
              "1": {"mean": 1.0, "std": 1.0, "percentile_00_5": 0.0, "percentile_99_5": 2.0}}


def test_planner_fills_in_the_default_windows():
    written = rfmedsam2_configuration(STAGE1, SAM2Settings(), PROPERTIES)["architecture"]["arch_kwargs"]
    assert written["intensity_windows"] == [[-3.0, 4.0], [-3.0, 3.0]]
    assert SAM2Settings.from_plans(written).intensity_windows == [[-3.0, 4.0], [-3.0, 3.0]]
    # windows given explicitly are kept; a wrong number of them is refused
    chosen = [[-1.0, 1.0], [-2.0, 2.0]]
    kept = rfmedsam2_configuration(STAGE1, SAM2Settings(intensity_windows=chosen), PROPERTIES)
    assert kept["architecture"]["arch_kwargs"]["intensity_windows"] == chosen
    with pytest.raises(ValueError, match="intensity_windows"):
        rfmedsam2_configuration(STAGE1, SAM2Settings(intensity_windows=[[-1.0, 1.0]]), PROPERTIES)


def test_plans_mixin_writes_the_windows_from_the_plans_being_saved():
    class Saving:
        def __init__(self, *args, plans_name=None, **kwargs):
            self.dataset_name = "Dataset999_Test"

        def save_plans(self, plans):
            self.saved = plans

    planner = type("SavingRFMedSAM2", (RFMedSAM2PlansMixin, Saving), {})()
    planner.save_plans({"configurations": {"3d_fullres": dict(STAGE1)},
                        "foreground_intensity_properties_per_channel": PROPERTIES})
    stage2 = planner.saved["configurations"]["3d_rfmedsam2"]
    assert stage2["architecture"]["arch_kwargs"]["intensity_windows"] == [[-3.0, 4.0], [-3.0, 3.0]]


def test_planned_hippocampus_plans_carry_the_zscore_window(planned_workspace):
    plans = json.loads(Path(planned_workspace["root"] / "preprocessed" / DATASET_NAME / f"{PLANS}.json").read_text())
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]
    written = plans["configurations"]["3d_rfmedsam2"]["architecture"]["arch_kwargs"]["intensity_windows"]
    assert written == default_intensity_windows(plans, "3d_fullres") == [[-3.0, 3.0]]
