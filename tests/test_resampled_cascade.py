"""The untrained cascade on data nnU-Net resamples: stage 1's label map, voxel for voxel, through the stock commands.

conftest's hippocampus workspace is 1 mm isotropic, where nnU-Net's resampling is the identity. Here a tiny raw
dataset is cut from the real abdominal CT (raw_dataset.abdomen_ct_source: ../shared/data or the vendored crop): a
box around the liver and the right kidney (labels 1 and 2: two objects for SAM 2), of which each case keeps every
fourth, third or second sagittal plane, so that it has 3 x 3 mm axial pixels and 12, 9 or 6 mm between its sagittal
planes. nnU-Net plans a target spacing that neither training case has (10.5 mm), puts that coarse axis first
(`transpose_forward`; SAM 2's slice axis), and resamples every case: the training cases in preprocessing, each test
image and its stage-1 prediction on the way in, the logits on the way out. The target spacing is anisotropic
(more than nnU-Net's ANISO_THRESHOLD), so nnU-Net resamples the coarse axis on its own, by nearest neighbour, and
the axial planes by interpolation: here only the coarse axis changes, except for one test image whose axial pixels
are resampled to 2.5 mm beforehand.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PLANS, TEST_SAM2_IMAGE_SIZE, assert_same_geometry, bin_command, run_command
from nnunetv2_rfmedsam.raw_dataset import ABDOMEN_CT_FILES, abdomen_ct_source

pytestmark = pytest.mark.slow

DATASET_ID = 921
DATASET_NAME = "Dataset921_AbdomenCTResampled"
FILE_ENDING = ".nii.gz"
# BTCV numbers of the organs kept, in the order of this dataset's labels 1, 2
ORGANS = {"liver": 6, "right_kidney": 2}
SAGITTAL_AXIS = 2  # of the arrays SimpleITK gives (z, y, x)
# case -> (every how many sagittal planes it keeps, the first one, flipped front to back in the array): the two
# training cases' spacings differ, so the planned spacing is neither; the test images are coarser and finer than it
TRAINING_CASES = {"ct_a": (4, 0, False), "ct_b": (3, 1, True)}
TEST_CASES = {"ct_coarse": (4, 2, False), "ct_fine": (2, 1, False)}
# a test image whose axial pixels are resampled to this spacing (mm) as well
AXIAL_CASE, AXIAL_CASE_PLANES, AXIAL_SPACING = "ct_axial_2_5mm", (4, 3, False), 2.5
# one training step per stage: stage 2's gates stay at their start (one AdamW step moved their logits by 2e-4);
# augmentation in the training process (see conftest)
ONE_STEP = {"RFMEDSAM2_NUM_EPOCHS": "1", "RFMEDSAM2_ITERS_PER_EPOCH": "1", "RFMEDSAM2_VAL_ITERS": "1",
            "nnUNet_n_proc_DA": "0"}
STAGE2_FOLD = "0"


def organ_box(labels: sitk.Image) -> tuple[list[int], list[int]]:
    """Start index and size (x, y, z) of the box around the kept organs."""
    kept = np.argwhere(np.isin(sitk.GetArrayViewFromImage(labels), list(ORGANS.values())))
    start, stop = kept.min(axis=0), kept.max(axis=0) + 1
    return [int(v) for v in start[::-1]], [int(v) for v in (stop - start)[::-1]]


def relabelled(labels: sitk.Image) -> sitk.Image:
    """The kept organs as labels 1, 2, ...; every other organ background."""
    array = sitk.GetArrayViewFromImage(labels)
    out = np.zeros(array.shape, dtype=np.uint8)
    for new, btcv in enumerate(ORGANS.values(), start=1):
        out[array == btcv] = new
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(labels)
    return image


def sagittal_planes(image: sitk.Image, step: int, first: int, flip: bool) -> sitk.Image:
    """Every `step`-th plane along x from `first` (SimpleITK's slicing sets spacing and origin), flipped along y in
    the array if asked (the geometry is kept: a second, mirrored anatomy)."""
    planes = image[first::step, :, :]
    return sitk.Flip(planes, [False, True, False]) if flip else planes


def with_axial_spacing(image: sitk.Image, spacing: float) -> sitk.Image:
    """The CT linearly resampled to `spacing` in x and y over the same extent."""
    new_spacing = (image.GetSpacing()[0], spacing, spacing)
    size = [int(round(n * old / new)) for n, old, new in zip(image.GetSize(), image.GetSpacing(), new_spacing)]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), new_spacing,
                         image.GetDirection(), -1024, image.GetPixelID())


def write_resampled_dataset(raw: Path) -> Path:
    """This module's raw dataset in `raw`/DATASET_NAME: the training cases with labels, the test images in
    imagesTs."""
    source = abdomen_ct_source()
    ct, labels = (sitk.ReadImage(str(source / name)) for name in ABDOMEN_CT_FILES)
    start, size = organ_box(labels)
    ct, labels = sitk.RegionOfInterest(ct, size, start), relabelled(sitk.RegionOfInterest(labels, size, start))
    dataset = raw / DATASET_NAME
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (dataset / folder).mkdir(parents=True)
    for case, planes in TRAINING_CASES.items():
        sitk.WriteImage(sagittal_planes(ct, *planes), str(dataset / "imagesTr" / f"{case}_0000{FILE_ENDING}"), True)
        sitk.WriteImage(sagittal_planes(labels, *planes), str(dataset / "labelsTr" / f"{case}{FILE_ENDING}"), True)
    for case, planes in TEST_CASES.items():
        sitk.WriteImage(sagittal_planes(ct, *planes), str(dataset / "imagesTs" / f"{case}_0000{FILE_ENDING}"), True)
    sitk.WriteImage(with_axial_spacing(sagittal_planes(ct, *AXIAL_CASE_PLANES), AXIAL_SPACING),
                    str(dataset / "imagesTs" / f"{AXIAL_CASE}_0000{FILE_ENDING}"), True)
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, **{name: i for i, name in enumerate(ORGANS, 1)}},
        "numTraining": len(TRAINING_CASES), "file_ending": FILE_ENDING}, indent=1))
    return dataset


@pytest.fixture(scope="module")
def resampled_workspace(tmp_path_factory, tiny_checkpoint):
    """Planned; stage 1 trained one step on fold `all` (its final validation writes the training cases'
    predictions for stage 2), stage 2 one step on fold 0 (one training, one validation case) from the random tiny
    SAM 2 checkpoint; the test images predicted by stage 1, then by the cascade from those predictions."""
    root = tmp_path_factory.mktemp("resampled")
    raw = write_resampled_dataset(root / "raw")
    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_n_proc_DA="1", nnUNet_compile="f", nnUNet_def_n_proc="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               RFMEDSAM2_SAM2_CHECKPOINT=str(tiny_checkpoint))
    env["nnUNet_extTrainer"] = run_command([bin_command("nnUNetv2_rfmedsam_ext_path")], env).stdout.strip()
    run_command([bin_command("nnUNetv2_rfmedsam_plan_and_preprocess"), "-d", str(DATASET_ID),
                 "-c", "3d_fullres", "3d_rfmedsam2", "-np", "1", "-npfp", "1", "--no_pbar",
                 "--sam2-image-size", str(TEST_SAM2_IMAGE_SIZE)], env)
    train = [bin_command("nnUNetv2_train"), str(DATASET_ID), "-p", PLANS, "-device", "cpu"]
    run_command(train + ["3d_fullres", "all", "-tr", "nnUNetTrainerRFPrompt"], dict(env, **ONE_STEP))
    (root / "preprocessed" / DATASET_NAME / "splits_final.json").write_text(
        json.dumps([{"train": ["ct_a"], "val": ["ct_b"]}]))
    run_command(train + ["3d_rfmedsam2", STAGE2_FOLD, "-tr", "nnUNetTrainerRFMedSAM2"], dict(env, **ONE_STEP))

    predict = [bin_command("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-d", str(DATASET_ID), "-p", PLANS,
               "-device", "cpu", "--disable_tta"]
    # stage 1 in nnU-Net's sequential path (-npp 0 -nps 0: no worker processes to start, ~10 s less); the cascade
    # in its default path of preprocessing and export workers. Both preprocess and export with the same functions.
    run_command(predict + ["-o", str(root / "stage1"), "-c", "3d_fullres", "-tr", "nnUNetTrainerRFPrompt", "-f", "all",
                           "-npp", "0", "-nps", "0"], env)
    run_command(predict + ["-o", str(root / "cascade"), "-c", "3d_rfmedsam2", "-tr", "nnUNetTrainerRFMedSAM2",
                           "-f", STAGE2_FOLD, "-prev_stage_predictions", str(root / "stage1"),
                           "-npp", "1", "-nps", "1"], env)
    return {"root": root, "raw": raw, "stage1": root / "stage1", "cascade": root / "cascade"}


def label_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def plans_of(workspace) -> dict:
    return json.loads((workspace["root"] / "preprocessed" / DATASET_NAME / f"{PLANS}.json").read_text())


def test_nnunet_transposes_and_resamples_every_case(resampled_workspace):
    """The coarse sagittal axis goes first; its planned spacing is none of the cases', anisotropic enough for
    nnU-Net's separate nearest-neighbour resampling; every training case's preprocessed array has another size
    along it than the case; every test image has another spacing than the plan."""
    import blosc2
    from nnunetv2.configuration import ANISO_THRESHOLD
    plans = plans_of(resampled_workspace)
    assert plans["transpose_forward"] == [SAGITTAL_AXIS, 0, 1]
    fullres = plans["configurations"]["3d_fullres"]
    coarse, *axial = fullres["spacing"]
    assert axial == [3.0, 3.0] and coarse / max(axial) > ANISO_THRESHOLD
    assert plans["configurations"]["3d_rfmedsam2"]["spacing"] == fullres["spacing"]
    preprocessed = resampled_workspace["root"] / "preprocessed" / DATASET_NAME / fullres["data_identifier"]
    for case in TRAINING_CASES:
        case_spacing = sitk.ReadImage(str(resampled_workspace["raw"] / "imagesTr" / f"{case}_0000{FILE_ENDING}"))\
            .GetSpacing()[0]
        assert not np.isclose(case_spacing, coarse), case
        properties = pickle.loads((preprocessed / f"{case}.pkl").read_bytes())
        raw_shape = list(properties["shape_after_cropping_and_before_resampling"])  # transposed, as nnU-Net keeps it
        resampled_shape = list(blosc2.open(str(preprocessed / f"{case}.b2nd")).shape[1:])
        assert resampled_shape[0] != raw_shape[0] and resampled_shape[1:] == raw_shape[1:], case
    for image in (resampled_workspace["raw"] / "imagesTs").iterdir():
        assert not np.isclose(sitk.ReadImage(str(image)).GetSpacing()[0], coarse), image.name


@pytest.mark.parametrize("case", TEST_CASES)
def test_untrained_cascade_equals_stage1_voxel_for_voxel(resampled_workspace, case):
    """Stage 1's label map -> resampled with the image to the plans' spacing -> the refiner at its start ->
    logits resampled back: stage 1's label map again, voxel for voxel, with the image's geometry. The test images
    are coarser (12 mm, upsampled to 10.5) and finer (6 mm, downsampled) than the plan along the sagittal axis."""
    image = resampled_workspace["raw"] / "imagesTs" / f"{case}_0000{FILE_ENDING}"
    stage1_file = resampled_workspace["stage1"] / f"{case}{FILE_ENDING}"
    cascade_file = resampled_workspace["cascade"] / f"{case}{FILE_ENDING}"
    assert_same_geometry(image, stage1_file)
    assert_same_geometry(image, cascade_file)
    stage1, cascade = label_array(stage1_file), label_array(cascade_file)
    # a label map constant across the sagittal planes would come back from any resampling along them
    assert np.any(np.diff(stage1, axis=SAGITTAL_AXIS)), "stage 1's label map does not vary across the resampled axis"
    assert np.array_equal(cascade, stage1), f"{np.count_nonzero(cascade != stage1)} of {stage1.size} voxels differ"


def test_untrained_cascade_equals_stage1_where_nnunet_resamples_the_axial_plane(resampled_workspace):
    """The same on an image with 2.5 mm axial pixels (the plan: 3 mm), resampled in every axis."""
    image = resampled_workspace["raw"] / "imagesTs" / f"{AXIAL_CASE}_0000{FILE_ENDING}"
    assert sitk.ReadImage(str(image)).GetSpacing()[1:] == (AXIAL_SPACING, AXIAL_SPACING)
    stage1 = label_array(resampled_workspace["stage1"] / f"{AXIAL_CASE}{FILE_ENDING}")
    cascade = label_array(resampled_workspace["cascade"] / f"{AXIAL_CASE}{FILE_ENDING}")
    assert_same_geometry(image, resampled_workspace["cascade"] / f"{AXIAL_CASE}{FILE_ENDING}")
    assert np.array_equal(cascade, stage1), f"{np.count_nonzero(cascade != stage1)} of {stage1.size} voxels differ"
