"""The napari plugin: its reader and doubtful slices here, and a person's whole session in the viewer, headless.

The session (tests/viewer_scenario.py) runs under Xvfb in a process of its own (Qt's offscreen platform has no
OpenGL context for napari's canvas), with the workspace's trained models, on a real held-out hippocampus case.
Stage 2's checkpoint has its prompt gates opened, so that the cascade is SAM 2's (random weights) and differs
from stage 1: the automatic pass then shows a result of its own, with doubtful slices and false positives to
correct. What holds whatever the weights is asserted: the automatic pass equals the stock commands voxel for
voxel, a negative click on a false positive removes its voxel, adds none, changes no other slice and touches no
other class, undo restores, the file saved has the image's geometry, the screenshot shows the overlay.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import (DATASET_NAME, STAGE1_FOLDER, STAGE2_FOLD, STAGE2_FOLDER, assert_same_geometry, bin_command,
                      run_command, write_gated_checkpoint)
from nnunetv2_rfmedsam.viewer.doubtful_slices import AGREEMENT_THRESHOLD, doubtful_slices
from nnunetv2_rfmedsam.viewer.reader import SOURCE_PATH, get_reader, read_image_layer

SCENARIO = Path(__file__).with_name("viewer_scenario.py")
XVFB = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24"]


def test_reader_keeps_the_geometry(hippocampus_cases):
    source, train, _ = hippocampus_cases
    path = source / "imagesTr" / f"{train[0]}_0000.nii.gz"
    assert get_reader(str(path)) is read_image_layer
    assert get_reader(str(path.with_suffix(".png"))) is None
    [(data, settings, kind)] = read_image_layer(str(path))
    image = sitk.ReadImage(str(path))
    assert kind == "image"
    np.testing.assert_array_equal(data, sitk.GetArrayFromImage(image))
    assert settings["scale"] == image.GetSpacing()[::-1] and settings["translate"] == image.GetOrigin()[::-1]
    assert settings["metadata"][SOURCE_PATH] == str(path.resolve())


def test_reader_names_a_file_it_cannot_read(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.nii.gz: SimpleITK cannot read it"):
        read_image_layer(str(broken))


def test_doubtful_slices_are_where_the_stages_disagree_or_stage1_hesitates():
    stage1 = np.zeros((4, 8, 8), dtype=np.uint8)
    stage1[:, 2:6, 2:6] = 1
    cascade = stage1.copy()
    cascade[1, 2:6, 2:4] = 0            # slice 1: Dice 2*8/(16+8) = 0.67 < 0.8
    probabilities = np.zeros((2, 4, 8, 8), dtype=np.float32)
    probabilities[1] = np.where(stage1 == 1, 0.99, 0.01)
    probabilities[0] = 1 - probabilities[1]
    probabilities[1, 3, 2:6, 2:6] = 0.6   # slice 3: certainty 0.2
    found = doubtful_slices(stage1, cascade, probabilities, {0: 0, 1: 1})
    assert [(s.class_id, s.slice_index) for s in found] == [(1, 3), (1, 1)]  # most doubtful first
    assert found[1].agreement == pytest.approx(2 / 3) and 2 / 3 < AGREEMENT_THRESHOLD
    assert found[0].certainty == pytest.approx(0.2)
    with pytest.raises(ValueError, match="one grid"):
        doubtful_slices(stage1, cascade[:2], probabilities, {0: 0, 1: 1})


@pytest.fixture(scope="module")
def viewer_models(stage2_workspace, tmp_path_factory):
    """Copies of the trained stage 1 and stage 2 (its prompt gates opened) side by side, as in nnUNet_results."""
    results = stage2_workspace["root"] / "results" / DATASET_NAME
    dataset = tmp_path_factory.mktemp("viewer_results") / DATASET_NAME
    shutil.copytree(results / STAGE1_FOLDER, dataset / STAGE1_FOLDER)
    stage2 = dataset / STAGE2_FOLDER
    (stage2 / f"fold_{STAGE2_FOLD}").mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy(results / STAGE2_FOLDER / name, stage2 / name)
    checkpoint = f"fold_{STAGE2_FOLD}/checkpoint_final.pth"
    write_gated_checkpoint(results / STAGE2_FOLDER / checkpoint, stage2 / checkpoint, 1.0)
    return dataset


@pytest.fixture(scope="module")
def case(stage2_workspace):
    raw, name = stage2_workspace["raw"], stage2_workspace["test"][0]
    return {"name": name, "image": raw / "imagesTs" / f"{name}_0000.nii.gz",
            "truth": raw / "labelsTs" / f"{name}.nii.gz"}


@pytest.fixture(scope="module")
def viewer_session(viewer_models, case, tmp_path_factory):
    """The scenario's observations, label maps and output folder."""
    if shutil.which("xvfb-run") is None:
        pytest.fail("xvfb-run is missing: run scripts/install.sh (it installs Xvfb and the libraries Qt needs)")
    out = tmp_path_factory.mktemp("viewer")
    env = dict(os.environ, OMP_NUM_THREADS="1", XDG_RUNTIME_DIR=str(out))
    proc = subprocess.run([*XVFB, sys.executable, str(SCENARIO), str(viewer_models / STAGE2_FOLDER),
                           str(case["image"]), str(case["truth"]), str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not (out / "observations.json").is_file():
        pytest.fail(f"the viewer scenario exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    observations = json.loads((out / "observations.json").read_text())
    if "click" not in observations:
        pytest.fail(f"the automatic pass did not finish: {observations}\n{proc.stderr[-5000:]}")
    return observations, dict(np.load(out / "label_maps.npz")), out


@pytest.fixture(scope="module")
def stock_predictions(viewer_models, case, stage2_workspace, tmp_path_factory):
    """The same case by the stock commands, default test-time mirroring: stage 1, then the cascade."""
    root = tmp_path_factory.mktemp("viewer_stock")
    (root / "in").mkdir()
    shutil.copy(case["image"], root / "in" / case["image"].name)
    common = ["-device", "cpu", "-npp", "1", "-nps", "1"]
    env = stage2_workspace["env"]
    run_command([bin_command("nnUNetv2_predict_from_modelfolder"), "-i", str(root / "in"), "-o", str(root / "stage1"),
                 "-m", str(viewer_models / STAGE1_FOLDER), "-f", "all", *common], env)
    run_command([bin_command("nnUNetv2_predict_from_modelfolder"), "-i", str(root / "in"), "-o", str(root / "cascade"),
                 "-m", str(viewer_models / STAGE2_FOLDER), "-f", STAGE2_FOLD, "-prev_stage_predictions",
                 str(root / "stage1"), *common], env)
    read = lambda folder: sitk.GetArrayFromImage(sitk.ReadImage(str(root / folder / f"{case['name']}.nii.gz")))
    return read("stage1"), read("cascade")


def test_automatic_pass_refuses_non_finite_voxels_before_stage1(viewer_models, case, tmp_path):
    """Read as stage 1 reads it (the plans' reader; MetaImage keeps NaN, SimpleITK's NIfTI reader would make it 0)."""
    from nnunetv2_rfmedsam.interactive import InteractiveError
    from nnunetv2_rfmedsam.viewer.automatic_pass import ModelChoice, run_automatic_pass
    image = sitk.ReadImage(str(case["image"]))
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    voxels[5, 6, 7] = np.nan
    path = tmp_path / "non_finite.mha"
    written = sitk.GetImageFromArray(voxels)
    written.CopyInformation(image)
    sitk.WriteImage(written, str(path))
    progress = []
    with pytest.raises(InteractiveError) as error:
        run_automatic_pass(path, ModelChoice.beside(viewer_models / STAGE2_FOLDER),
                           lambda done, total, message: progress.append(message))
    assert str(error.value) == f"image {path}: 1 of {voxels.size} voxels are not finite (NaN or infinite); the " \
                               f"model needs finite intensities"
    assert progress == ["stage 1: loading the prompt UNet"]  # stage 1 did not run


def test_automatic_pass_refuses_a_nifti_cut_short_before_stage1(viewer_models, case, tmp_path):
    """SimpleITK, the plans' reader, reads a .nii.gz cut to 2 KB as an image of mostly zeros: refused as stored."""
    from nnunetv2_rfmedsam.interactive import InteractiveError
    from nnunetv2_rfmedsam.viewer.automatic_pass import ModelChoice, run_automatic_pass
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(case["image"].read_bytes()[:2048])
    progress = []
    with pytest.raises(InteractiveError) as error:
        run_automatic_pass(path, ModelChoice.beside(viewer_models / STAGE2_FOLDER),
                           lambda done, total, message: progress.append(message))
    assert str(error.value).startswith(f"image {path}: is damaged: its gzip stream is cut short or corrupt")
    assert progress == ["stage 1: loading the prompt UNet"]  # stage 1 did not run


def test_automatic_pass_is_the_stock_cascade(viewer_session, stock_predictions):
    observations, maps, _ = viewer_session
    stage1, cascade = stock_predictions
    np.testing.assert_array_equal(maps["stage1"], stage1)
    np.testing.assert_array_equal(maps["automatic"], cascade)
    assert (cascade != stage1).any()  # the open gates make the cascade SAM 2's
    assert observations["layers"][:2] == [observations["image_layer"]["name"],
                                          f"{observations['image_layer']['name']} RFMedSAM 2"]
    assert observations["label_names"] == {"0": "background", "1": "Anterior", "2": "Posterior"}


def test_automatic_pass_shows_its_progress_and_the_doubtful_slices(viewer_session):
    observations, maps, _ = viewer_session
    done = [step[0] for step in observations["progress"]]
    assert done == sorted(done) and done[-1] == 100
    assert any(message.startswith("cascade: slice") for _, _, message in observations["progress"])
    assert observations["doubtful"] and all(line.startswith("slice ") for line in observations["doubtful"])
    went = observations["went_to"]
    assert went["current_step"] == went["item"]  # choosing a doubtful slice shows it


def test_an_error_is_shown_and_the_viewer_goes_on(viewer_session):
    observations, _, _ = viewer_session
    assert "Error: model folder" in observations["status_after_error"]
    assert "checkpoint_missing.pth" in observations["status_after_error"]
    assert observations["labels_kept_after_error"]
    assert "not named <trainer>__<plans>__<configuration>" in observations["status_after_wrong_folder"]


def test_a_negative_click_removes_a_false_positive_and_no_other_class(viewer_session, case):
    observations, maps, _ = viewer_session
    slice_index, y, x = observations["click"]
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case["truth"])))
    automatic, after = maps["automatic"], maps["after_click"]
    assert automatic[slice_index, y, x] == 1 and truth[slice_index, y, x] != 1
    assert after[slice_index, y, x] == 0 and ((after == 1) <= (automatic == 1)).all()
    others = [d for d in range(len(automatic)) if d != slice_index]
    np.testing.assert_array_equal(after[others], automatic[others])
    np.testing.assert_array_equal(after == 2, automatic == 2)
    assert observations["click_latency"] > 0
    print(f"click to updated layer: {observations['click_latency']:.2f} s; box: {observations['box_latency']:.2f} s")


def test_a_box_for_one_class_keeps_the_other(viewer_session):
    observations, maps, _ = viewer_session
    np.testing.assert_array_equal(maps["after_box"] == 1, maps["after_click"] == 1)
    box_slice = observations["box_slice"]
    assert ((maps["after_box"][box_slice] == 2) != (maps["after_click"][box_slice] == 2)).any()
    others = [d for d in range(len(maps["after_box"])) if d != box_slice]
    np.testing.assert_array_equal(maps["after_box"][others], maps["after_click"][others])


def test_undo_restores_the_label_map_and_the_prompt_layers(viewer_session):
    observations, maps, _ = viewer_session
    np.testing.assert_array_equal(maps["after_first_undo"], maps["after_click"])
    np.testing.assert_array_equal(maps["after_second_undo"], maps["automatic"])
    assert observations["boxes_after_undo"] == 0 and observations["negative_clicks_after_undo"] == 0
    assert observations["undo_enabled_at_end"] is False


def test_saved_label_map_has_the_image_geometry(viewer_session, case):
    observations, maps, _ = viewer_session
    saved = Path(observations["saved"])
    assert_same_geometry(case["image"], saved)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(saved))), maps["after_click"])
    assert [p.name for p in saved.parent.iterdir() if ".tmp." in p.name] == []


def test_screenshot_shows_the_overlay(viewer_session):
    _, _, out = viewer_session
    with_labels = matplotlib.image.imread(out / "viewer.png")
    without = matplotlib.image.imread(out / "viewer_without_labels.png")
    assert with_labels.shape == without.shape and with_labels.shape[0] >= 600
    changed = np.abs(with_labels[..., :3] - without[..., :3]).max(axis=-1) > 0.05
    assert changed.mean() > 0.01  # the label colours cover part of the canvas (a redraw-less grab: 0.0005)
