"""Interactive use: the session API, propagation and corrections, the CLIs, the click simulation, and the
refiner's training on point prompts.

The session tests use the stage-2 model the stage-2 tests train (tiny budget, random SAM 2 weights), on real
hippocampus cases. Its outputs are arbitrary, so the tests check what holds by construction: where results come
from (memory, cached features, reused slices), what prompts reach SAM 2, and what the session guarantees
whatever the weights.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from conftest import DATASET_NAME, STAGE1_FOLDER, STAGE2_FOLD, STAGE2_FOLDER, assert_same_geometry, bin_command
from nnunetv2_rfmedsam.cli import click_eval, interactive
from nnunetv2_rfmedsam.cli.plan_and_preprocess import build_parser, sam2_settings_from_args
from nnunetv2_rfmedsam.evaluation.metrics import dice_score
from nnunetv2_rfmedsam.evaluation.plots import DPI
from nnunetv2_rfmedsam.interactive import InteractiveError, InteractiveSession, PromptError
from nnunetv2_rfmedsam.interactive.click_simulation import next_click, start_box
from nnunetv2_rfmedsam.model.error_clicks import sample_error_clicks
from nnunetv2_rfmedsam.model.network import RFMedSAM2Network
from nnunetv2_rfmedsam.model.prompts import NEGATIVE_CLICK, NOT_A_POINT, POSITIVE_CLICK
from nnunetv2_rfmedsam.model.refinement import SliceWalk
from nnunetv2_rfmedsam.settings import SAM2Settings, SettingsError
from nnunetv2_rfmedsam.trainers.passes_loss import RefinementPassesLoss
from nnunetv2_rfmedsam.trainers.rfmedsam2_trainer import nnUNetTrainerRFMedSAM2

CLASS = 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(stage2_workspace):
    return stage2_workspace["root"] / "results" / DATASET_NAME / STAGE2_FOLDER


@pytest.fixture(scope="module")
def case(stage2_workspace):
    """A held-out case: image path, its ground truth and the SimpleITK image."""
    raw, name = stage2_workspace["raw"], stage2_workspace["test"][0]
    image_path = raw / "imagesTs" / f"{name}_0000.nii.gz"
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTs" / f"{name}.nii.gz")))
    return {"image": image_path, "truth": truth, "sitk": sitk.ReadImage(str(image_path))}


@pytest.fixture(scope="module")
def loaded_session(model_dir, case):
    session = InteractiveSession.from_model_folder(model_dir, STAGE2_FOLD)
    session.set_image(case["image"])
    return session


@pytest.fixture
def session(loaded_session):
    loaded_session.reset()
    return loaded_session


def truth_box(truth: np.ndarray, class_id: int = CLASS) -> tuple[int, tuple[int, int, int, int]]:
    return start_box(truth == class_id)


def class_logits(session: InteractiveSession, class_id: int = CLASS) -> torch.Tensor:
    return session.logits()[session.channel_of_label[class_id]]


def network_slice(session: InteractiveSession, slice_index: int) -> int:
    return int(round(session.image.to_network_grid((slice_index, 20, 18))[0]))


# --- the session API ---

def test_round_trip_on_a_hippocampus_case(session, case, tmp_path):
    slice_index, box = truth_box(case["truth"])
    session.add_box(CLASS, slice_index, box)
    session.propagate()
    boxed = session.label_map()
    assert boxed.shape == case["truth"].shape
    assert set(np.unique(boxed)) <= {0, 1, 2} and (boxed == CLASS).any()

    y0, x0, y1, x1 = box
    session.add_points(CLASS, slice_index, [((y0 + y1) // 2, (x0 + x1) // 2, 1), (y0, x1, 0)])
    session.propagate()
    corrected = session.label_map()
    assert not np.array_equal(corrected, boxed)  # the points reached SAM 2

    written = session.save(tmp_path / "out" / "seg.nii.gz")
    assert [p.name for p in written.parent.iterdir()] == ["seg.nii.gz"]  # no temporary file left
    assert_same_geometry(case["image"], written)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written))), corrected)

    assert session.undo() == f"prompt 2 (class {CLASS}, slice {slice_index})"
    assert np.array_equal(session.label_map(), boxed)
    features = session.features
    session.reset()
    assert not session.label_map().any()
    assert session.features is features
    with pytest.raises(InteractiveError, match="nothing to undo"):
        session.undo()


def test_set_image_from_an_array_matches_the_file(model_dir, case, session):
    array_session = InteractiveSession.from_model_folder(model_dir, STAGE2_FOLD)
    array_session.set_image(sitk.GetArrayFromImage(case["sitk"]), spacing=case["sitk"].GetSpacing()[::-1])
    slice_index, box = truth_box(case["truth"])
    for s in (session, array_session):
        s.add_box(CLASS, slice_index, box)
    assert np.array_equal(array_session.label_map(), session.label_map())


def test_propagation_reaches_unprompted_slices_from_memory(session, case):
    """One box on one slice: the slices before and after it, which have no prompt, are segmented, and what they
    show comes from the prompted slice through memory (a different box there changes them)."""
    slice_index, box = truth_box(case["truth"])
    session.add_box(CLASS, slice_index, box)
    computed = session.propagate()[CLASS]
    d = network_slice(session, slice_index)
    depth = session.image.grid_shape[0]
    # forward from the box to the last slice, then backward to the first
    assert computed == tuple(range(d, depth)) + tuple(range(d - 1, -1, -1))
    labels = session.label_map()
    for other in (slice_index - 3, slice_index + 3):
        assert (labels[other] == CLASS).any(), other
    before = class_logits(session)

    session.undo()
    y0, x0, y1, x1 = box
    session.add_box(CLASS, slice_index, (y0, x0, y0 + (y1 - y0) // 2, x0 + (x1 - x0) // 2))
    after = class_logits(session)
    for other in (d - 3, d + 3):
        assert not torch.equal(before[other], after[other]), other


def test_slices_sam2_scores_as_without_the_object_are_empty(session, case):
    """SAM 2's occlusion decision on unprompted slices, as in its video predictor: with its object-score head
    made to say "absent" everywhere, only the prompted slice keeps the class."""
    hook = session.network.sam.sam_mask_decoder.pred_obj_score_head.register_forward_hook(
        lambda module, args, output: output - 1000.0)
    try:
        slice_index, box = truth_box(case["truth"])
        session.add_box(CLASS, slice_index, box)
        labels = session.label_map()
    finally:
        hook.remove()
    has_class = (labels == CLASS).any(axis=(1, 2))
    assert has_class[slice_index] and has_class.sum() == 1


def test_corrections_reuse_cached_features_and_unchanged_slices(session, case):
    encoder_calls, prompt_points = [], []
    encoder_hook = session.network.sam.image_encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    prompt_hook = session.network.sam.sam_prompt_encoder.register_forward_pre_hook(
        lambda _, args, kwargs: prompt_points.append((kwargs["points"], kwargs["masks"])), with_kwargs=True)
    try:
        slice_index, box = truth_box(case["truth"])
        session.add_box(CLASS, slice_index, box)
        session.propagate()
        first = class_logits(session)
        d = network_slice(session, slice_index)

        # a positive click two slices further: the slices up to it are reused, not recomputed
        y0, x0, y1, x1 = box
        session.add_points(CLASS, slice_index + 2, [((y0 + y1) // 2, (x0 + x1) // 2, 1)])
        prompt_points.clear()
        computed = session.propagate()[CLASS]
        assert min(computed) == 0 and d not in computed and d + 1 not in computed and computed[0] == d + 2
        second = class_logits(session)
        assert torch.equal(first[d:d + 2], second[d:d + 2])
        # the corrected slice was prompted by its click alone (no padded box slot: SAM 2's one-click rule applies)
        # and, as mask prompt, its previous result
        (coords, labels), masks = prompt_points[0]
        assert labels.tolist() == [[POSITIVE_CLICK]] and masks is not None

        # a negative click beside the box reaches SAM 2 with the box
        session.add_points(CLASS, slice_index, [(y0, x0, 0)])
        prompt_points.clear()
        session.propagate()
        (_, labels), masks = prompt_points[0]
        assert labels.tolist() == [[2, 3, NEGATIVE_CLICK]] and masks is not None

        assert session.propagate() == {CLASS: ()}  # nothing changed: nothing computed
        assert encoder_calls == []  # no prompt re-encodes the image
    finally:
        encoder_hook.remove()
        prompt_hook.remove()


def test_negative_click_removes_a_false_positive_slice(session, case):
    """Propagation from a box extends the class to slices where the ground truth has none (random weights do
    this everywhere); a negative click there, on a slice without a box or positive click, removes the class
    from that slice by construction, and leaves the slices from the box up to it as they were."""
    truth = case["truth"] == CLASS
    slice_index, box = truth_box(case["truth"])
    session.add_box(CLASS, slice_index, box)
    labels = session.label_map()
    beyond = [s for s in range(slice_index + 1, truth.shape[0]) if not truth[s].any() and (labels[s] == CLASS).any()]
    assert beyond, "the precondition failed: no false-positive slice after the box"
    target = beyond[0]
    ys, xs = np.nonzero(labels[target] == CLASS)
    before = class_logits(session)

    session.add_points(CLASS, target, [(int(ys[len(ys) // 2]), int(xs[len(xs) // 2]), 0)])
    after_labels = session.label_map()
    assert not (after_labels[target] == CLASS).any()
    # the slices from the box up to the click are reused as they were
    assert np.array_equal(after_labels[slice_index:target], labels[slice_index:target])
    d, d_target = network_slice(session, slice_index), network_slice(session, target)
    assert torch.equal(class_logits(session)[d:d_target], before[d:d_target])


@pytest.mark.parametrize("prompt, message", [
    (dict(class_id=CLASS, slice_index=5, points=[(70, 5, 1)]), "prompt 1 (class 1, slice 5): point (70, 5) is "
                                                                 "outside the image of size"),
    (dict(class_id=CLASS, slice_index=5, box=(10, 10, 10, 20)), "prompt 1 (class 1, slice 5): box (10, 10, 10, 20) "
                                                                  "has zero area"),
    (dict(class_id=CLASS, slice_index=5, box=(20, 10, 10, 20)), "is inverted"),
    (dict(class_id=7, slice_index=5, points=[(10, 10, 1)]), "prompt 1 (class 7, slice 5): class 7 is not a class "
                                                              "of this model; classes: 1 (Anterior), 2 (Posterior)"),
    (dict(class_id=CLASS, slice_index=999, points=[(10, 10, 1)]), "prompt 1 (class 1, slice 999): slice 999 is "
                                                                    "beyond the volume of"),
    (dict(class_id=CLASS, slice_index=5, points=[(10, 10, 3)]), "has label 3"),
    (dict(class_id=CLASS, slice_index=5), "give a box or at least one point"),
])
def test_bad_prompts_raise_prompt_errors(session, prompt, message):
    with pytest.raises(PromptError) as error:
        session.add_prompt(**prompt)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value, ValueError)
    with pytest.raises(InteractiveError, match="nothing to undo"):  # a refused prompt leaves no trace
        session.undo()


def test_mask_prompts_every_slice_of_the_class_with_its_box_and_mask(session, case):
    truth = case["truth"]
    prompted = []
    hook = session.network.sam.sam_prompt_encoder.register_forward_pre_hook(
        lambda _, args, kwargs: prompted.append(kwargs["points"][1][0, :2].tolist() == [2, 3]
                                                and kwargs["masks"] is not None), with_kwargs=True)
    try:
        session.add_mask(CLASS, truth)
        session.propagate()
    finally:
        hook.remove()
    assert sum(prompted) == int((truth == CLASS).any(axis=(1, 2)).sum())
    with pytest.raises(PromptError, match="the mask has no voxel of class 2"):
        session.add_mask(2, np.where(truth == 2, 0, truth))


def test_replacing_a_masked_slice_with_negative_clicks_removes_the_class_there(session, case):
    """A mask prompt gives a slice box and mask; negative clicks added to them leave the class to SAM 2 (the box
    says it is there), negative clicks that replace them remove it from that slice by construction."""
    truth = case["truth"]
    target = int(np.argmax((truth == CLASS).sum(axis=(1, 2))))
    ys, xs = np.nonzero(truth[target] == CLASS)
    click = [(int(ys[0]), int(xs[0]), 0)]
    session.add_mask(CLASS, truth)
    session.add_points(CLASS, target, click)
    kept = session.class_mask(CLASS)
    session.undo()
    session.add_prompt(CLASS, target, points=click, replace=True)
    replaced = session.class_mask(CLASS)
    assert not replaced[target].any()
    assert (truth[target] == CLASS).any()  # the class was there in the mask prompt
    d = network_slice(session, target)
    assert session._prompts[CLASS][d].box is None and session._prompts[CLASS][d].mask_logits is None
    assert kept.shape == replaced.shape == truth.shape


def test_class_mask_is_the_class_alone(session, case):
    truth = case["truth"]
    session.add_mask(1, truth)
    session.add_mask(2, truth)
    labels = session.label_map()
    for class_id in (1, 2):
        alone = session.class_mask(class_id)
        assert (alone | (labels != class_id)).all()  # where the label map has the class, so does its mask alone
    assert session.class_mask(1).dtype == bool
    session.reset()
    assert not session.class_mask(1).any()


def test_viewer_corrections_touch_one_class_and_undo_together(session, case):
    """The viewer's Corrections on the session: a refinement seeds the class from the label map and changes only
    its voxels on the prompted slice (taking background only), and one undo takes back the seed and the clicks
    together (where corrections reach: tests/test_local_corrections.py)."""
    from nnunetv2_rfmedsam.interactive.corrections import Box, Click, Corrections
    truth = case["truth"].astype(np.uint8)
    corrections = Corrections(session, truth)
    target = int(np.argmax((truth == 1).sum(axis=(1, 2))))
    ys, xs = np.nonzero(truth[target] == 1)
    refined = corrections.refine(1, clicks=[Click(target, float(ys[0]), float(xs[0]), False)])
    assert refined[target, ys[0], xs[0]] == 0 and ((refined == 1) <= (truth == 1)).all()
    np.testing.assert_array_equal(refined == 2, truth == 2)
    assert len(session._history) == 2  # the seed and the slice's clicks
    slice2 = int(np.argmax((truth == 2).sum(axis=(1, 2))))
    ys, xs = np.nonzero(truth[slice2] == 2)
    boxed = corrections.refine(2, boxes=[Box(slice2, ys.min(), xs.min(), ys.max(), xs.max())], overwrite=False)
    np.testing.assert_array_equal(boxed == 1, refined == 1)
    np.testing.assert_array_equal(corrections.undo(), refined)
    np.testing.assert_array_equal(corrections.undo(), truth)
    assert session._history == [] and not corrections.can_undo
    # allowed to, a class takes other classes' voxels on the prompted slice
    height, width = truth.shape[1:]
    whole_slice = Box(slice2, 0, 0, height - 1, width - 1)
    kept = corrections.refine(2, boxes=[whole_slice])
    np.testing.assert_array_equal(kept == 1, truth == 1)
    taken = corrections.refine(2, boxes=[whole_slice], overwrite=True, label_map=kept)
    mask = session.class_mask(2)[slice2]
    np.testing.assert_array_equal(taken[slice2] == 2, mask)
    np.testing.assert_array_equal(taken[slice2] == 1, (kept[slice2] == 1) & ~mask)
    others = [d for d in range(len(truth)) if d != slice2]
    np.testing.assert_array_equal(taken[others], kept[others])
    np.testing.assert_array_equal(corrections.reset(), truth)
    assert session._history == [] and not corrections.can_undo
    with pytest.raises(PromptError, match="outside the image"):
        corrections.refine(1, clicks=[Click(target, 500.0, 5.0, True)])
    assert session._history == []  # the seed of the refused refinement is taken back
    with pytest.raises(ValueError, match="add a click or a box"):
        corrections.refine(1)


def test_set_image_refuses_non_finite_voxels_and_keeps_the_image(session, case, tmp_path):
    """NaN and infinity, in a file (MetaImage: SimpleITK's NIfTI reader turns them into 0) or an array, are refused
    before anything is computed; the image set before stays."""
    voxels = sitk.GetArrayFromImage(case["sitk"]).astype(np.float32)
    voxels[3, 10, 10], voxels[4, 0, 0] = np.nan, np.inf
    path = tmp_path / "non_finite.mha"
    written = sitk.GetImageFromArray(voxels)
    written.CopyInformation(case["sitk"])
    sitk.WriteImage(written, str(path))
    image, features = session.image, session.features
    for bad, name in ((path, f"image {path}"), (voxels, "image array")):
        with pytest.raises(InteractiveError) as error:
            session.set_image(bad)
        assert str(error.value) == f"{name}: 2 of {voxels.size} voxels are not finite (NaN or infinite); the model " \
                                   f"needs finite intensities"
    assert session.image is image and session.features is features


def test_set_image_refuses_a_nifti_cut_short_or_of_nan_that_simpleitk_reads(session, case, tmp_path):
    """SimpleITK reads a .nii.gz cut to 2 KB as a whole image, and NaN in a NIfTI file as 0: the session checks
    NIfTI files as stored, before anything is computed."""
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(case["image"].read_bytes()[:2048])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(cut))).shape == case["truth"].shape  # read without a word
    nan = tmp_path / "nan.nii.gz"
    voxels = np.full(case["truth"].shape, np.nan, dtype=np.float32)
    written = sitk.GetImageFromArray(voxels)
    written.CopyInformation(case["sitk"])
    sitk.WriteImage(written, str(nan))
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(nan))).any()  # SimpleITK: zeros
    image = session.image
    for path, problem in ((cut, "is damaged: its gzip stream is cut short or corrupt"),
                          (nan, f"{voxels.size} of {voxels.size} voxels are not finite")):
        with pytest.raises(InteractiveError) as error:
            session.set_image(path)
        message = str(error.value)
        assert message.startswith(f"image {path}: {problem}") and "\n" not in message, message
    assert session.image is image


def test_unusable_model_folder_is_named(tmp_path):
    with pytest.raises(InteractiveError, match=f"model folder {tmp_path}: no dataset.json"):
        InteractiveSession.from_model_folder(tmp_path, 0)


# --- the command-line tool ---

def write_prompts(path, prompts) -> str:
    path.write_text(json.dumps({"prompts": prompts}))
    return str(path)


def test_cli_writes_a_segmentation_with_the_input_geometry(model_dir, case, stage2_workspace, tmp_path):
    slice_index, box = truth_box(case["truth"])
    prompts = write_prompts(tmp_path / "prompts.json", [
        {"class": 1, "slice": slice_index, "box": list(box), "points": [[box[0] + 2, box[1] + 2, 1]]},
        {"class": 2, "slice": slice_index, "points": [[box[0], box[3], 1], [box[2], box[1], 0]]}])
    output = tmp_path / "seg.nii.gz"
    env = dict(stage2_workspace["env"], OMP_NUM_THREADS="1")
    proc = subprocess.run([bin_command("nnUNetv2_rfmedsam_interactive"), "-m", str(model_dir), "-f", STAGE2_FOLD,
                           "-i", str(case["image"]), "--prompts", prompts, "-o", str(output)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_geometry(case["image"], output)


@pytest.mark.parametrize("prompt, message", [
    ({"class": 1, "slice": 5, "points": [[70, 5, 1]]}, "error: prompt 2 (class 1, slice 5): point (70, 5) is outside"),
    ({"class": 1, "slice": 5, "box": [10, 10, 10, 20]}, "error: prompt 2 (class 1, slice 5): box (10, 10, 10, 20) "
                                                        "has zero area"),
    ({"class": 9, "slice": 5, "points": [[10, 10, 1]]}, "error: prompt 2 (class 9, slice 5): class 9 is not a class"),
    ({"class": 1, "slice": 500, "box": [5, 5, 10, 10]}, "error: prompt 2 (class 1, slice 500): slice 500 is beyond"),
    ({"class": 1, "points": [[10, 10, 1]]}, "error: prompts file"),
])
def test_cli_refuses_bad_prompts_with_one_line(model_dir, case, tmp_path, capsys, prompt, message):
    prompts = write_prompts(tmp_path / "prompts.json", [{"class": 2, "slice": 3, "points": [[10, 10, 1]]}, prompt])
    with pytest.raises(SystemExit) as exit_:
        interactive.main(["-m", str(model_dir), "-f", STAGE2_FOLD, "-i", str(case["image"]), "--prompts", prompts,
                          "-o", str(tmp_path / "seg.nii.gz")])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(message) and stderr.count("\n") == 1
    assert not (tmp_path / "seg.nii.gz").exists()


# --- click simulation ---

def test_next_click_is_inside_the_largest_error_region():
    truth = np.zeros((12, 20, 20), dtype=bool)
    truth[2:9, 3:12, 3:12] = True
    prediction = truth.copy()
    prediction[3:8, 5:10, 5:10] = False           # a false negative of 125 voxels
    prediction[0, 15:18, 15:18] = True            # a false positive of 9
    z, y, x, label = next_click(prediction, truth, (1.0, 1.0, 1.0))
    assert label == 1 and (z, y, x) == (5, 7, 7)  # the centre of the hole
    prediction[3:8, 5:10, 5:10] = True
    prediction[8:12, 12:20, 12:20] = True         # now a false positive of 256 voxels is the largest error
    z, y, x, label = next_click(prediction, truth, (1.0, 1.0, 1.0))
    assert label == 0 and prediction[z, y, x] and not truth[z, y, x]
    assert next_click(truth, truth, (1.0, 1.0, 1.0)) is None
    assert dice_score(truth, truth) == 1.0 and dice_score(truth, ~truth) == 0.0 and dice_score(truth & False, truth & False) == 1.0


def test_start_box_is_the_truth_box_on_the_largest_slice():
    truth = np.zeros((5, 10, 10), dtype=bool)
    truth[1, 2:4, 2:4] = True
    truth[3, 1:6, 4:9] = True
    assert start_box(truth) == (3, (1, 4, 5, 8))
    line = np.zeros((2, 10, 10), dtype=bool)
    line[0, 4, 2:6] = True
    assert start_box(line) == (0, (4, 2, 5, 5))  # widened to a nonzero area


@pytest.fixture(scope="module")
def click_cases(stage2_workspace, tmp_path_factory):
    """A real training case in a folder of its own, and stage 1's prediction of it (its fold-`all` validation
    writes them in the original geometry)."""
    root, raw = tmp_path_factory.mktemp("click_cases"), stage2_workspace["raw"]
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for name in stage2_workspace["train"][:1]:
        shutil.copy(raw / "imagesTr" / f"{name}_0000.nii.gz", root / "images")
        shutil.copy(raw / "labelsTr" / f"{name}.nii.gz", root / "labels")
    stage1 = stage2_workspace["root"] / "results" / DATASET_NAME / STAGE1_FOLDER / "fold_all" / "validation"
    return {"images": root / "images", "labels": root / "labels", "stage1": stage1,
            "names": stage2_workspace["train"][:1]}


@pytest.mark.parametrize("start", ["box", "stage1"])
def test_click_evaluation_writes_dice_by_clicks(model_dir, click_cases, tmp_path, start, capsys):
    output = tmp_path / "clicks"
    extra = ["--prev_stage_predictions", str(click_cases["stage1"])] if start == "stage1" else []
    click_eval.main(["-m", str(model_dir), "-f", STAGE2_FOLD, "-i", str(click_cases["images"]),
                     "--gt", str(click_cases["labels"]), "--start", start, "--clicks", "2", "-o", str(output), *extra])
    assert "mean Dice by clicks: 0:" in capsys.readouterr().out
    summary = json.loads((output / "clicks.json").read_text())
    assert list(summary["mean_dice_by_clicks"]) == ["0", "1", "2"]
    assert set(summary["cases"]) == set(click_cases["names"])
    for per_class in summary["cases"].values():
        assert set(per_class) == {"1", "2"}
        assert all(len(curve) == 3 and all(0 <= d <= 1 for d in curve) for curve in per_class.values())
    curves = [c for per_class in summary["cases"].values() for c in per_class.values()]
    assert summary["mean_dice_by_clicks"]["2"] == pytest.approx(np.mean([c[2] for c in curves]))
    assert set(summary["mean_dice_by_class"]) == {"1", "2"}
    png = output / "dice_vs_clicks.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert matplotlib.image.imread(str(png)).shape[:2] == (4 * DPI, 6 * DPI)
    assert sorted(p.name for p in output.iterdir()) == ["clicks.json", "dice_vs_clicks.png"]


def test_click_evaluation_from_stage1_needs_its_predictions(model_dir, click_cases, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        click_eval.main(["-m", str(model_dir), "-f", STAGE2_FOLD, "-i", str(click_cases["images"]),
                         "--gt", str(click_cases["labels"]), "--start", "stage1", "--clicks", "1",
                         "-o", str(tmp_path / "out")])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: --start stage1 needs --prev_stage_predictions") and stderr.count("\n") == 1


def test_click_evaluation_refuses_a_corrupt_stage1_prediction(model_dir, click_cases, tmp_path, capsys):
    predictions = tmp_path / "stage1"
    predictions.mkdir()
    for name in click_cases["names"]:
        shutil.copy(click_cases["stage1"] / f"{name}.nii.gz", predictions)
    corrupt = predictions / f"{click_cases['names'][0]}.nii.gz"
    corrupt.write_bytes(b"not a NIfTI file")
    with pytest.raises(SystemExit) as exit_:
        click_eval.main(["-m", str(model_dir), "-f", STAGE2_FOLD, "-i", str(click_cases["images"]),
                         "--gt", str(click_cases["labels"]), "--start", "stage1", "--prev_stage_predictions",
                         str(predictions), "--clicks", "1", "-o", str(tmp_path / "out")])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    # after the progress bar: one error line
    assert f"error: stage-1 prediction: label map {corrupt} cannot be read" in stderr and stderr.count("error:") == 1
    assert not (tmp_path / "out").exists()


# --- training with point prompts ---

def test_error_clicks_sit_in_errors_with_their_label():
    target = torch.zeros(1, 3, 8, 8, dtype=torch.bool)
    predicted = torch.zeros_like(target)
    target[0, 0, 2:5, 2:5] = True                 # slice 0: all missed -> positive click
    predicted[0, 1, 1:3, 5:8] = True              # slice 1: a false positive -> negative click
    target[0, 2, 0:2, 0:2] = predicted[0, 2, 0:2, 0:2] = True  # slice 2: correct -> no click
    torch.manual_seed(0)
    for _ in range(5):
        clicks, labels = sample_error_clicks(predicted, target)
        assert clicks.shape == (1, 3, 1, 2) and labels.shape == (1, 3, 1)
        assert labels[0, :, 0].tolist() == [POSITIVE_CLICK, NEGATIVE_CLICK, NOT_A_POINT]
        (x0, y0), (x1, y1) = clicks[0, 0, 0].long().tolist(), clicks[0, 1, 0].long().tolist()
        assert target[0, 0, y0, x0] and predicted[0, 1, y1, x1] and not target[0, 1, y1, x1]


def tiny_network(**changes) -> RFMedSAM2Network:
    torch.manual_seed(0)
    settings = dict(model_size="tiny", image_size=64, adapter_width=8, refinement_passes=2, slices_per_patch=3,
                    use_memory=True, box_jitter=0.0, **changes)
    return RFMedSAM2Network(input_channels=1 + 2, num_classes=3, **settings)


def synthetic_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(x, target): stage-1 masks that are the target shifted, so pass 1 has errors on every slice."""
    generator = torch.Generator().manual_seed(0)
    target = torch.zeros(1, 1, 3, 20, 24, dtype=torch.long)
    target[0, 0, :, 4:12, 5:13] = 1
    target[0, 0, :, 13:18, 10:20] = 2
    x = torch.zeros(1, 3, 3, 20, 24)
    x[0, 0] = torch.randn(3, 20, 24, generator=generator) + target[0, 0].float()
    x[0, 1, :, 6:14, 7:15] = 1
    x[0, 2, :, 12:17, 8:18] = 1
    return x, target


def second_pass_point_labels(network: RFMedSAM2Network, x: torch.Tensor, target=None) -> list[list[int]]:
    """The point labels SAM 2 gets on each slice of the second pass (one row per object)."""
    calls, correcting, original_step = [], [False], SliceWalk.step
    original = network.sam._forward_sam_heads

    def step(walk, *args, **kwargs):  # pass 2 corrects pass 1's output on the slice
        correcting[0] = kwargs.get("correcting") is not None
        return original_step(walk, *args, **kwargs)

    def recording(*args, **kwargs):
        points = kwargs["point_inputs"]  # None on the slices training leaves unprompted in pass 1
        calls.append((correcting[0], None if points is None else points["point_labels"]))
        return original(*args, **kwargs)

    network.sam._forward_sam_heads = recording
    if target is not None:
        network.set_click_targets(target)
    SliceWalk.step = step
    try:
        with torch.no_grad():
            network(x)
    finally:
        SliceWalk.step = original_step
        del network.sam._forward_sam_heads
    assert {second for second, _ in calls} == {False, True}, "expected SAM 2 heads of two passes"
    return [labels.tolist() for second, labels in calls if second]


def test_second_pass_gets_clicks_at_first_pass_errors_in_training_only():
    network = tiny_network().train()
    x, target = synthetic_batch()
    with_clicks = second_pass_point_labels(network, x, target)
    assert all(len(row) == 3 for labels in with_clicks for row in labels)  # box corners + one click
    assert any(row[2] in (POSITIVE_CLICK, NEGATIVE_CLICK) for labels in with_clicks for row in labels)
    assert network._click_targets is None  # consumed by the forward
    # without a target, in evaluation, or with the plans' switch off: box and mask prompts only
    assert all(len(row) == 2 for labels in second_pass_point_labels(network, x) for row in labels)
    network.eval()
    assert all(len(row) == 2 for labels in second_pass_point_labels(network, x, target) for row in labels)
    switched_off = tiny_network(train_with_clicks=False).train()
    assert all(len(row) == 2 for labels in second_pass_point_labels(switched_off, x, target) for row in labels)


def test_trainer_hands_the_target_to_the_network_before_the_step():
    """nnUNetTrainerRFMedSAM2.train_step on a minimal trainer: the network's forward received the target."""
    network = tiny_network().train()
    x, target = synthetic_batch()
    received = []
    network.set_click_targets = lambda t: (received.append(t), RFMedSAM2Network.set_click_targets(network, t))
    trainer = object.__new__(nnUNetTrainerRFMedSAM2)  # only the attributes nnUNetTrainer.train_step reads
    trainer.network, trainer.is_ddp, trainer.device, trainer.grad_scaler = network, False, torch.device("cpu"), None
    trainer.optimizer = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=0.0)
    trainer.loss = RefinementPassesLoss(lambda output, t: F.cross_entropy(output, t[:, 0]))
    result = trainer.train_step({"data": x, "target": target})
    assert np.isfinite(result["loss"])
    assert len(received) == 1 and received[0] is target and network._click_targets is None


def test_click_training_switch_reaches_the_settings(stage2_workspace):
    assert sam2_settings_from_args(build_parser().parse_args(["-d", "4"])).train_with_clicks is True
    args = build_parser().parse_args(["-d", "4", "--sam2-no-click-training"])
    assert sam2_settings_from_args(args).train_with_clicks is False
    with pytest.raises(SettingsError, match="train_with_clicks"):
        SAM2Settings(train_with_clicks="yes")
    assert "Point prompts in training (pass 2 gets a click at pass 1's errors on each slice): on" in \
        stage2_workspace["stage2_log"]


def test_sessions_need_an_image_first(model_dir):
    fresh = InteractiveSession.from_model_folder(model_dir, STAGE2_FOLD)
    with pytest.raises(PromptError, match="no image; call set_image first"):
        fresh.add_box(CLASS, 0, (1, 1, 5, 5))
    with pytest.raises(InteractiveError, match="label_map: no image"):
        fresh.label_map()


# --- memory ---

def test_session_holds_each_slices_features_once_and_the_positions_for_one(session):
    """The features of every slice in one buffer per level; the position encodings, the same for every slice, once
    (README: bytes per slice at input 1024)."""
    features = session.features
    depth = session.image.grid_shape[0]
    assert features.shared_positions and all(p.shape[1] == 1 for p in features.vision_pos_embeds)
    assert all(x.shape[1] == depth for x in features.vision_feats)
    expected = sum(h * w * x.shape[2] * x.element_size() for x, (h, w) in zip(features.vision_feats,
                                                                                features.feat_sizes))
    assert features.bytes_per_slice() == expected
    print(f"session features at input {session.network.settings.image_size}: {expected} bytes per slice, "
          f"{sum(p.numel() * p.element_size() for p in features.vision_pos_embeds)} bytes of positions in all")


def test_features_over_the_budget_are_held_on_the_host_with_the_same_results(model_dir, case, session):
    """`feature_budget_gb`: a volume's features larger than the budget stay in host memory (pinned where the device
    is a GPU) and come to the device a slice at a time; the results are the same."""
    box_slice, box = truth_box(case["truth"])
    session.add_box(CLASS, box_slice, box)
    offloaded = InteractiveSession.from_model_folder(model_dir, STAGE2_FOLD, feature_budget_gb=0)
    offloaded.set_image(case["image"])
    assert offloaded.features.device == offloaded.device
    assert all(x.device.type == "cpu" for x in offloaded.features.vision_feats)
    assert session.features.device is None  # no budget: held on the device, as before
    offloaded.add_box(CLASS, box_slice, box)
    torch.testing.assert_close(class_logits(offloaded), class_logits(session), atol=0, rtol=0)


def test_held_features_come_to_the_compute_device_one_image_at_a_time(session):
    """Where SAM 2 computes elsewhere than the features are held ('meta' stands for a GPU here), a slice's
    features reach it as one image, expanded over the objects there."""
    streamed = dataclasses.replace(session.features, device=torch.device("meta"))
    features, positions = streamed.for_objects(3, 2)
    assert all(x.device.type == "meta" and x.shape[1] == 2 and x.stride(1) == 0 for x in features + positions)


def test_undo_beyond_the_kept_results_recomputes_the_same(session, case):
    """The history keeps device results for its latest actions only; undoing further recomputes them, equal."""
    from nnunetv2_rfmedsam.interactive.session import UNDO_WITH_RESULTS
    truth = case["truth"]
    slices = [d for d in range(truth.shape[0]) if (truth[d] == CLASS).any()][:UNDO_WITH_RESULTS + 2]
    maps = []
    for d in slices:
        ys, xs = np.nonzero(truth[d] == CLASS)
        session.add_points(CLASS, d, [(int(ys[0]), int(xs[0]), 1)])
        maps.append(session.label_map())
    assert [a.tracks is None for a in session._history] == \
        [True] * (len(slices) - UNDO_WITH_RESULTS) + [False] * UNDO_WITH_RESULTS
    for expected in reversed(maps[:-1]):
        session.undo()
        np.testing.assert_array_equal(session.label_map(), expected)
