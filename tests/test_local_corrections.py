"""Corrections stay where the person asked (interactive/corrections.py), on the workspace's trained models.

The automatic result a person corrects is stage 1's prediction of a held-out case by the stock nnUNetv2_predict
(the cascade of a refiner whose gates are still closed gives the same). Each correction goes through the trained
refiner twice: with its trained gates (closed after the tests' few steps: the session keeps the seeded mask) and
with its gates opened (SAM 2's own logits from random weights, the worst a correction can get). Whatever the
weights: a correction changes only the slices it prompted, a negative click removes and adds nothing, a box
bounds its class on its slice, a click holds at its voxel, and other classes keep every voxel.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from conftest import DATASET_NAME, STAGE2_FOLD, STAGE2_FOLDER
from nnunetv2_rfmedsam.interactive import InteractiveSession
from nnunetv2_rfmedsam.interactive.click_simulation import simulate_class
from nnunetv2_rfmedsam.interactive.corrections import Box, Click, Corrections
from nnunetv2_rfmedsam.evaluation.metrics import dice_score

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GATES = {"trained gates": None, "gates open": 1.0}


@pytest.fixture(scope="module")
def case(stage2_workspace, stage1_test_predictions):
    raw, name = stage2_workspace["raw"], stage2_workspace["test"][0]
    read = lambda path: sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return {"image": raw / "imagesTs" / f"{name}_0000.nii.gz", "truth": read(raw / "labelsTs" / f"{name}.nii.gz"),
            "automatic": read(stage1_test_predictions / f"{name}.nii.gz")}


@pytest.fixture(scope="module")
def loaded_session(stage2_workspace, case):
    session = InteractiveSession.from_model_folder(
        stage2_workspace["root"] / "results" / DATASET_NAME / STAGE2_FOLDER, STAGE2_FOLD)
    session.set_image(case["image"])
    return session


@pytest.fixture(params=list(GATES))
def corrections(request, loaded_session, case):
    network = loaded_session.network
    trained = network.prompt_gate_logits.detach().clone()
    if GATES[request.param] is not None:
        network.set_prompt_gates(GATES[request.param])
    loaded_session.reset()
    yield Corrections(loaded_session, case["automatic"])
    network.prompt_gate_logits.data.copy_(trained)


def interior_point(region: np.ndarray) -> tuple[int, int, int]:
    """The voxel of a 3-D region farthest from its border, on the slice where the region is largest."""
    d = int(np.argmax(region.sum(axis=(1, 2))))
    distance = ndimage.distance_transform_edt(np.pad(region[d], 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return d, int(y), int(x)


def assert_only_slices_changed(before: np.ndarray, after: np.ndarray, slices: set[int]) -> None:
    untouched = [d for d in range(len(before)) if d not in slices]
    np.testing.assert_array_equal(after[untouched], before[untouched])


def test_a_negative_click_on_a_false_positive_removes_and_adds_nothing(corrections, case):
    automatic, truth = case["automatic"], case["truth"]
    false_positive = (automatic == 1) & (truth != 1)
    assert false_positive.any(), "the workspace's stage 1 has no false positive of class 1 to click"
    d, y, x = interior_point(false_positive)
    after = corrections.refine(1, clicks=[Click(d, float(y), float(x), positive=False)])
    assert after[d, y, x] == 0
    assert ((after == 1) <= (automatic == 1)).all()  # nothing added, anywhere
    assert (after == 1).sum() < (automatic == 1).sum()
    assert_only_slices_changed(automatic, after, {d})
    np.testing.assert_array_equal(after[automatic != 1], automatic[automatic != 1])  # other classes kept
    gates = corrections.session.network.prompt_gates.detach()[-1].tolist()
    print(f"gates {gates}: a negative click on slice {d} removed {int((automatic == 1).sum() - (after == 1).sum())} "
          f"voxels of class 1")


def test_a_box_changes_its_slice_only_and_bounds_its_class_there(corrections, case):
    automatic, truth = case["automatic"], case["truth"]
    d = int(np.argmax((truth == 2).sum(axis=(1, 2))))
    ys, xs = np.nonzero(truth[d] == 2)
    box = Box(d, float(ys.min()), float(xs.min()), float(ys.max()), float(xs.max()))
    after = corrections.refine(2, boxes=[box])
    assert_only_slices_changed(automatic, after, {d})
    outside = np.ones(truth.shape[1:], dtype=bool)
    outside[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = False
    assert not (after[d][outside] == 2).any()
    np.testing.assert_array_equal(after == 1, automatic == 1)
    print(f"a box on slice {d}: class 2 there {int((automatic[d] == 2).sum())} -> {int((after[d] == 2).sum())} voxels")


def test_a_positive_click_changes_its_slice_only_and_holds_at_its_voxel(corrections, case):
    automatic, truth = case["automatic"], case["truth"]
    missed = (truth == 2) & (automatic == 0)
    d, y, x = interior_point(missed)
    after = corrections.refine(2, clicks=[Click(d, float(y), float(x), positive=True)])
    assert after[d, y, x] == 2
    assert_only_slices_changed(automatic, after, {d})
    np.testing.assert_array_equal(after == 1, automatic == 1)


def test_clicks_of_earlier_corrections_hold_when_their_slice_is_corrected_again(corrections, case):
    automatic, truth = case["automatic"], case["truth"]
    d, y, x = interior_point((automatic == 1) & (truth != 1))
    corrections.refine(1, clicks=[Click(d, float(y), float(x), positive=False)])
    ys, xs = np.nonzero(automatic[d] == 1)
    again = corrections.refine(1, boxes=[Box(d, float(ys.min()), float(xs.min()), float(ys.max()), float(xs.max()))])
    assert again[d, y, x] != 1
    assert_only_slices_changed(automatic, again, {d})


def test_propagating_lets_the_other_slices_follow(corrections, case):
    """Asked to propagate, the other slices take the session's result: with closed gates, the seeded mask they
    already hold; with open gates, SAM 2's, which differs somewhere."""
    automatic, truth = case["automatic"], case["truth"]
    d, y, x = interior_point((automatic == 1) & (truth != 1))
    after = corrections.refine(1, clicks=[Click(d, float(y), float(x), positive=False)], propagate=True)
    others = [s for s in range(len(automatic)) if s != d]
    gates_open = float(corrections.session.network.prompt_gates.detach().min()) > 0.5
    assert (after[others] != automatic[others]).any() == gates_open
    np.testing.assert_array_equal(after[automatic == 2], automatic[automatic == 2])


def test_the_session_keeps_a_seeded_mask_while_its_gates_are_closed(loaded_session, case):
    """A class started from a mask is the cascade's gated mix: closed gates return the mask voxel for voxel."""
    loaded_session.reset()
    assert float(loaded_session.network.prompt_gates.max()) < 0.01
    loaded_session.add_mask(1, case["automatic"])
    np.testing.assert_array_equal(loaded_session.class_mask(1), case["automatic"] == 1)


def test_a_seeded_class_follows_the_gate_of_the_last_pass(loaded_session, case):
    """The last pass, the one trained on clicks, decides: its gate closed keeps the mask whatever the first pass's
    gate; its gate open follows SAM 2 (random weights here), whatever the first pass's."""
    network = loaded_session.network
    trained = network.prompt_gate_logits.detach().clone()
    seeded = {}
    try:
        for name, gates in {"last closed": [[1.0], [0.0]], "last open": [[0.0], [1.0]]}.items():
            network.set_prompt_gates(torch.tensor(gates))
            loaded_session.reset()
            loaded_session.add_mask(1, case["automatic"])
            seeded[name] = loaded_session.class_mask(1)
    finally:
        network.prompt_gate_logits.data.copy_(trained)
    np.testing.assert_array_equal(seeded["last closed"], case["automatic"] == 1)
    assert (seeded["last open"] != (case["automatic"] == 1)).any()


def test_click_simulation_from_stage1_starts_at_stage1_and_never_loses(loaded_session, case):
    """From stage 1, click 0 scores what stage 1 scores, and with the trained (closed) gates no click lowers the
    Dice: each click holds at its voxel and the rest stays."""
    loaded_session.reset()
    spacing = loaded_session.image.properties["spacing"]
    for class_id in (1, 2):
        target = case["truth"] == class_id
        curve = simulate_class(loaded_session, class_id, target, "stage1", case["automatic"], 3, spacing)
        assert curve[0] == dice_score(target, case["automatic"] == class_id)
        assert all(later >= earlier for earlier, later in zip(curve, curve[1:])), curve
        assert curve[-1] > curve[0]
