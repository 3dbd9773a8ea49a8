"""Fidelity of the whole path, from nnU-Net's preprocessed volume and a stage-1 label map to SAM 2's masks, with
negative controls.

tests/test_fidelity.py holds the refiner's SAM 2 calls to sam2's predictors with prompts made by hand. Here the
refiner starts where it starts in nnU-Net: a preprocessed volume (a real hippocampus MRI given 3 mm voxels along
x, so that nnU-Net's rules put that axis first and resample the slices to a non-square grid; transposed,
z-scored and resampled by nnU-Net's own functions) and a label map preprocessed as nnU-Net preprocesses
segmentations. The network's own code makes SAM 2's frames (`RFMedSAM2Network.sam_frames`), the first pass's box
prompts (`_first_pass_prompts`), the second pass's box, mask and click (`_next_pass_prompts`) and walks the slices
(`SliceWalk`). sam2's SAM2VideoPredictor gets each slice as the image a user would give it (the z-scored slice
windowed to [0, 1] as an H x W x 3 float image, made into a frame by sam2's own `SAM2Transforms`), boxes taken
from the label map in its own pixel convention (x0, y0, x1, y1 of the foreground, given with the slice's size) and
the same clicks by pixel; SAM2ImagePredictor gets slice 0 with a box and a mask prompt. 20 slices (more than SAM 2's 16 object pointers, so the memory bank is trimmed), two
objects, both boxed on the first slice; the mask decoder's output layers are scaled (in both models) so that
logits are of order 1-10.

Tolerance: one object at a time, the refiner reproduces the video predictor to the bit (EXACT, atol 1e-6; measured
0.0). Two objects run in one SAM 2 batch in the refiner and one by one in the video predictor; float32 sums in
another order then differ by up to 3e-5 on these logits (measured), so the batched comparisons use atol 1e-4
(BATCHED). The smallest effect of a planted bug below is 3.6e-4 (bf16_memory_storage_removed, caught at 0.0
noise by the exact comparison).

Negative controls (`test_planted_bug_breaks_the_comparison`): each bug is planted by monkeypatching, and at least
one comparison must then fail. The comparisons: `walk` (box on slice 0 for both objects, the slices after it from
memory alone: SAM 2's layout, SAM2_BEHAVIOUR), `walk_each_object_alone` (the same, one object per walk, EXACT),
`corrections` (the same walk, each slice then corrected as the refiner's second pass corrects it: a box and a mask
from pass 1's result and a click at one of its errors, against the video predictor clicking on the frame it just
tracked), `absent_from_memory` (the walk with SAM 2's object-score head made to say "absent" on one slice, in both
models, and the refiner's rule for objects found absent), `first_slice_box_and_mask` (slice 0 with the network's
own first-pass prompts, box and stage-1 mask, in the refiner's behaviour, against SAM2ImagePredictor given the
box and the mask as `mask_input`, each object alone, EXACT). The bugs, with the largest logit change each caused
in the comparison that must catch it (measured), and that comparison:
- box_height_width_swap: `prompts_from_masks` gives `boxes_to_square_frame` the slice's shape as (W, H); 3.5: walk.
- click_x_y_swap: the second pass's clicks are scaled with x and y swapped (`error_clicks`); 3.6: corrections.
- memory_one_frame_early: each non-conditioning memory is stored under the slice before it; 0.05: walk.
- non_conditioning_memories_dropped: only the conditioning frame is remembered; 0.97: walk.
- bf16_memory_storage_removed: memories are kept in float32 in evaluation; 3.6e-4: walk_each_object_alone.
- wrong_intensity_window: the z-score window is (-4, 4) instead of (-3, 3); 2.1: walk.
- objects_remembered_as_present: an object found absent is remembered as present; 0.02: absent_from_memory.
- slices_walked_in_reverse: after the conditioning slice 0 the walk goes from the last slice back; 0.97: walk.
- mask_prompt_transposed: `masks_to_prompt_logits` transposes the mask prompt; 2.5: first_slice_box_and_mask.
Measured with every comparison (`python3 tests/test_fidelity_path.py` prints the table): each bug of the walk but
the click and the remembered presence breaks the four comparisons of the walk; those two, and the transposed mask
prompt, break only the comparison named.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from PIL import Image
from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape
from sam2.build_sam import build_sam2_video_predictor
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2.modeling.sam2_base import NO_OBJ_SCORE
from sam2.utils.transforms import SAM2Transforms

from nnunetv2_rfmedsam.model import error_clicks, frames, prompts as prompts_module, refinement
from nnunetv2_rfmedsam.model import network as network_module
from nnunetv2_rfmedsam.model.adapters import adapter_parameter_names
from nnunetv2_rfmedsam.model.departures import REFINER, SAM2_BEHAVIOUR
from nnunetv2_rfmedsam.model.error_clicks import sample_error_clicks
from nnunetv2_rfmedsam.model.network import RFMedSAM2Network
from nnunetv2_rfmedsam.model.prompts import POSITIVE_CLICK, HostLayout
from nnunetv2_rfmedsam.model.refinement import ABSENT_LOGIT, MemoryBank, SliceFeatures, SliceWalk, encode_slices, logits_to_grid
from nnunetv2_rfmedsam.model.sam2_model import sam2_hydra_overrides
from nnunetv2_rfmedsam.raw_dataset import hippocampus_source, list_cases
from nnunetv2_rfmedsam.settings import SAM2_MODELS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 128
NUM_SLICES = 20
CLASSES = (1, 2)
# the hippocampus case's voxels as given (array order): 3 mm along x; nnU-Net puts the axis of the largest spacing
# first (ExperimentPlanner.determine_transpose) and resamples the others to the target spacing
GIVEN_SPACING = (1.0, 1.0, 3.0)
TRANSPOSE = (2, 0, 1)
TARGET_SPACING = (3.0, 1.25, 0.8)
# output layers of the mask decoder scaled by this: logits of order 1-10 instead of 0.1
LOGIT_SCALE = 30.0
# one object at a time the refiner reproduces the video predictor to the bit (measured: 0.0); SAM 2 batches the
# refiner's objects, where the video predictor runs each alone, and float32 sums in another order differ by up to
# 3e-5 (measured) on these logits, a little more once a memory rounds to bfloat16 the other way. The smallest
# planted bug moves logits by 4e-4 (bf16_memory_storage_removed) with both objects, by more alone.
EXACT = dict(atol=1e-6, rtol=0)
BATCHED = dict(atol=1e-4, rtol=0)
ABSENT_SLICE = 6
# the video predictor feeds a corrected frame's previous logits through SAM 2's decoder, as the refiner's second
# pass feeds its first result
CORRECTING = dataclasses.replace(SAM2_BEHAVIOUR, mask_prompts_through_decoder=True)


def nnunet_preprocessed_case() -> tuple[np.ndarray, np.ndarray]:
    """(image (D, H, W) z-scored, label map (D, H, W)) of a hippocampus case on nnU-Net's grid for GIVEN_SPACING,
    cut to NUM_SLICES slices starting at the first slice where both classes are present."""
    source = hippocampus_source()
    case = list_cases(source)[0]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.nii.gz")))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz")))
    image, label = image.transpose(TRANSPOSE)[None].astype(np.float32), label.transpose(TRANSPOSE)[None]
    spacing = [GIVEN_SPACING[axis] for axis in TRANSPOSE]
    image = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={}).run(image)
    shape = compute_new_shape(image.shape[1:], spacing, TARGET_SPACING)
    image = resample_data_or_seg_to_shape(image, shape, spacing, TARGET_SPACING, is_seg=False, order=3, order_z=0,
                                          force_separate_z=None)[0]
    label = resample_data_or_seg_to_shape(label, shape, spacing, TARGET_SPACING, is_seg=True, order=1, order_z=0,
                                          force_separate_z=None)[0]
    both = np.nonzero([all((s == c).any() for c in CLASSES) for s in label])[0]
    first = int(both[0])
    assert len(label) - first >= NUM_SLICES, "the case has too few slices with both classes"
    return image[first:first + NUM_SLICES], label[first:first + NUM_SLICES]


def user_image(slice_: np.ndarray) -> np.ndarray:
    """A z-scored slice as the H x W x 3 float image in [0, 1] a user hands sam2 (window: frames.ZSCORE_WINDOW)."""
    low, high = -3.0, 3.0
    unit = np.clip((slice_.astype(np.float32) - low) / (high - low), 0, 1)
    return np.repeat(unit[..., None], 3, axis=2)


def user_box(mask: np.ndarray) -> np.ndarray:
    """The box of a 2-D mask in sam2's pixel convention: (x0, y0, x1, y1) of its first and last foreground pixels."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


@pytest.fixture(scope="module")
def case():
    return build_case()


def build_case() -> dict:
    """The preprocessed case, the network (random weights, adapters at their identity start) and the video
    predictor with the same SAM 2 weights."""
    image, label = nnunet_preprocessed_case()
    assert image.shape[1] != image.shape[2], "the slices should not be square"
    torch.manual_seed(0)
    network = RFMedSAM2Network(1 + len(CLASSES), 1 + len(CLASSES), image_size=SIZE, start_at_prompt=False,
                               intensity_windows=[list(frames.ZSCORE_WINDOW)]).eval()
    for mlp in network.sam.sam_mask_decoder.output_hypernetworks_mlps:
        with torch.no_grad():
            mlp.layers[-1].weight.mul_(LOGIT_SCALE)
            mlp.layers[-1].bias.mul_(LOGIT_SCALE)
    predictor = build_sam2_video_predictor(SAM2_MODELS["tiny"][0], ckpt_path=None, device="cpu", mode="eval",
                                           hydra_overrides_extra=sam2_hydra_overrides(SIZE),
                                           apply_postprocessing=False)
    adapters = adapter_parameter_names(network.sam)
    predictor.load_state_dict({k: v for k, v in network.sam.state_dict().items() if k not in adapters})
    x = torch.cat([torch.from_numpy(image)[None]] + [torch.from_numpy(label == c)[None].float() for c in CLASSES])
    return {"image": image, "label": label, "network": network, "predictor": predictor, "x": x[None]}


def video_state(case, tmp_path):
    """A video predictor state whose frames are the case's slices as sam2 makes frames of user images."""
    depth, height, width = case["image"].shape
    for d in range(depth):
        Image.new("RGB", (width, height)).save(tmp_path / f"{d:05d}.jpg")
    state = case["predictor"].init_state(video_path=str(tmp_path))
    assert (state["video_height"], state["video_width"]) == (height, width)
    transforms = SAM2Transforms(resolution=SIZE, mask_threshold=0.0)
    state["images"] = torch.stack([transforms(user_image(s)) for s in case["image"]])
    state["cached_features"] = {}  # init_state encoded the placeholder frame 0 already
    return state


def stored_logits(state, obj_idx: int, d: int) -> torch.Tensor:
    """An object's latest low-resolution logits on a frame (prompts given since the last propagation first)."""
    for outputs in (state["temp_output_dict_per_obj"][obj_idx], state["output_dict_per_obj"][obj_idx]):
        for kind in ("cond_frame_outputs", "non_cond_frame_outputs"):
            if d in outputs[kind]:
                return outputs[kind][d]["pred_masks"][0, 0].float().clone()
    raise KeyError(f"object {obj_idx} has no output on frame {d}")


def track_frame(predictor, state, d: int) -> None:
    for frame, _, _ in predictor.propagate_in_video(state, start_frame_idx=d, max_frame_num_to_track=0):
        assert frame == d


# --- the video predictor: a user's boxes on slice 0, the rest from memory, optionally a click on every frame ---

def video_predictor_walk(case, tmp_path, corrections=None) -> dict[tuple[int, int], torch.Tensor]:
    """{(object, slice): low-resolution logits}; with `corrections` {(object, slice): (box, click)}, each frame is
    tracked, then corrected with that box and click (SAM 2 adds the frame's previous logits as a mask prompt)."""
    predictor, label = case["predictor"], case["label"]
    tracked, corrected = {}, {}
    with torch.inference_mode():
        state = video_state(case, tmp_path)
        for k, c in enumerate(CLASSES):
            predictor.add_new_points_or_box(state, frame_idx=0, obj_id=c, box=user_box(label[0] == c))
        for d in range(NUM_SLICES):
            if d > 0:
                track_frame(predictor, state, d)
            for k, c in enumerate(CLASSES):
                tracked[k, d] = stored_logits(state, k, d)
                if corrections is not None:
                    box, (x, y, click_label) = corrections[k, d]
                    predictor.add_new_points_or_box(state, frame_idx=d, obj_id=c, box=box, points=np.array([[x, y]]),
                                                    labels=np.array([click_label]), clear_old_points=True)
                    corrected[k, d] = stored_logits(state, k, d)
    return corrected if corrections is not None else tracked


# --- the refiner: the network's own frames, prompts and walk ---

def encode_one_by_one(network: RFMedSAM2Network, image: torch.Tensor) -> SliceFeatures:
    """The image encoder run on one slice at a time, as the video predictor runs it: batched, its float32 results
    differ in the last bits (about 1e-5 on these logits), which would hide the smallest planted bugs' effect."""
    parts = [encode_slices(network.sam, network.sam_frames(image[:, :, d:d + 1]), 1) for d in range(image.shape[2])]
    return SliceFeatures([torch.cat(level, dim=1) for level in zip(*(p.vision_feats for p in parts))],
                         [torch.cat(level, dim=1) for level in zip(*(p.vision_pos_embeds for p in parts))],
                         parts[0].feat_sizes, len(parts))


def refiner_walk(case, departures=SAM2_BEHAVIOUR, correct: bool = False, seed: int = 0, kept=None):
    """({(object, slice): logits}, {(object, slice): (box, click)} the corrections used, in the user's pixels);
    `kept`: the indices into CLASSES of the objects to walk (default: all, in one SAM 2 batch).

    Pass 1: the network's first-pass prompts from the label map, the box kept on slice 0 only (the others are left
    to memory, as training leaves slices); pass 2 (`correct`): the network's second-pass prompts (box and mask from
    pass 1's result, one click at an error against the label map), on pass 1's memory-conditioned features."""
    network, x, label = case["network"], case["x"], case["label"]
    depth, height, width = label.shape
    kept = list(range(len(CLASSES))) if kept is None else list(kept)
    objects = x[0, 1:][kept]
    targets = torch.stack([torch.from_numpy(label == CLASSES[k]) for k in kept])
    results, corrections = {}, {}
    with torch.no_grad():
        features = encode_one_by_one(network, x[:, :1])
        # the box alone on slice 0 (a video predictor takes a box or a mask on a frame, not both)
        # with the host's copy of where each object is, as the network's forward gives it (host_syncs.py)
        layout = HostLayout.of_boxes(objects.flatten(2).any(dim=2).numpy())
        first = dataclasses.replace(network._first_pass_prompts(objects, layout),
                                    unprompted=frozenset(range(1, depth)), unmasked=frozenset(range(depth)))
        walk = SliceWalk(network.sam, depth, use_memory=True, departures=departures, unprompted=first.unprompted)
        for step, d in enumerate(walk.order):
            out = walk.step(step, features, d, first, d, remember=not correct)
            if not correct:
                for n, k in enumerate(kept):
                    results[k, d] = out.low_res[n, 0]
                continue
            grid = logits_to_grid(out.low_res, (height, width))
            slice_logits = network._class_logits(grid, objects[None, :, d:d + 1], 0)
            torch.manual_seed(seed + d)
            second = network._next_pass_prompts(slice_logits, out, torch.arange(len(kept)), targets, d)
            corrected = walk.step(step, features, d, second, 0, correcting=out)
            predicted = (slice_logits[0, 1:, 0] > 0).numpy()
            torch.manual_seed(seed + d)  # the same draw, to tell the video predictor where the click went
            clicks, click_labels = sample_error_clicks(torch.from_numpy(predicted)[:, None], targets[:, d:d + 1])
            for n, k in enumerate(kept):
                results[k, d] = corrected.low_res[n, 0]
                x_, y_ = clicks[n, 0, 0].tolist()
                corrections[k, d] = (user_box(predicted[n]), (x_, y_, int(click_labels[n, 0, 0])))
    return results, corrections


# --- one slice with the refiner's own first-pass prompts (box and stage-1 mask): SAM2ImagePredictor ---

def user_mask_prompt(mask: np.ndarray) -> np.ndarray:
    """A 2-D mask as the low-resolution logits SAM2ImagePredictor takes as `mask_input` (1, S/4, S/4): resized
    with antialiasing and scaled to +-10, SAM 2's logits for a mask given as output (`_use_mask_as_output`)."""
    resized = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(SIZE // 4, SIZE // 4),
                            mode="bilinear", align_corners=False, antialias=True)
    return ((2 * resized[0] - 1) * 10.0).numpy()


def image_predictor_first_slice(case) -> dict[tuple[int, int], torch.Tensor]:
    """{(object, 0): low-resolution logits} of SAM2ImagePredictor given slice 0, one object's box and mask."""
    predictor = SAM2ImagePredictor(case["predictor"])
    # its backbone feature sizes are written for 1024 inputs
    predictor._bb_feat_sizes = [(SIZE // 4, SIZE // 4), (SIZE // 8, SIZE // 8), (SIZE // 16, SIZE // 16)]
    predictor.set_image(user_image(case["image"][0]))
    results = {}
    for k, c in enumerate(CLASSES):
        mask = case["label"][0] == c
        _, _, low_res = predictor.predict(box=user_box(mask), mask_input=user_mask_prompt(mask),
                                          multimask_output=False, return_logits=True)
        results[k, 0] = torch.from_numpy(low_res[0])
    return results


def refiner_first_slice(case) -> dict[tuple[int, int], torch.Tensor]:
    """The refiner's slice 0 with the network's first-pass prompts (box and mask from the label map), each object
    alone, in the refiner's own behaviour (REFINER: a prompted object is present, its mask prompt goes through
    the decoder, as SAM2ImagePredictor takes it)."""
    network, x = case["network"], case["x"]
    results = {}
    with torch.no_grad():
        features = encode_one_by_one(network, x[:, :1, :1])
        for k in range(len(CLASSES)):
            prompts = network._first_pass_prompts(x[0, 1 + k:2 + k, :1])
            walk = SliceWalk(network.sam, 1, use_memory=True, departures=REFINER)
            results[k, 0] = walk.step(0, features, 0, prompts, 0).low_res[0, 0]
    return results


@pytest.fixture(scope="module")
def references(case, tmp_path_factory):
    return build_references(case, tmp_path_factory.mktemp)


def build_references(case, new_folder) -> dict:
    """The video predictor's logits for each comparison, computed once (`new_folder(name)`: an empty folder)."""
    _, corrections = refiner_walk(case, CORRECTING, correct=True)
    with absent_on_slice(case, ABSENT_SLICE):
        absent = video_predictor_walk(case, new_folder("absent"))
    return {"first_slice_box_and_mask": image_predictor_first_slice(case),
            "walk": video_predictor_walk(case, new_folder("walk")),
            "corrections": (video_predictor_walk(case, new_folder("corrections"), corrections), corrections),
            "absent_from_memory": absent}


class absent_on_slice:
    """SAM 2's object-score head says "absent" on one slice, for every object, in the refiner's SAM 2 and in the
    video predictor alike (both note the frame their `_track_step` is on)."""

    def __init__(self, case, slice_index: int):
        self.models = [case["network"].sam, case["predictor"]]
        self.slice_index = slice_index

    def __enter__(self):
        self.handles = []
        for model in self.models:
            step = model._track_step

            def noting_frame(*args, model=model, step=step, **kwargs):
                model._frame_in_step = kwargs["frame_idx"] if "frame_idx" in kwargs else args[0]
                return step(*args, **kwargs)

            model._track_step = noting_frame

            def absent(module, inputs, output, model=model):
                return output - 100.0 if getattr(model, "_frame_in_step", None) == self.slice_index else output

            self.handles.append(model.sam_mask_decoder.pred_obj_score_head.register_forward_hook(absent))
        return self

    def __exit__(self, *exc):
        for model, handle in zip(self.models, self.handles):
            handle.remove()
            del model._track_step
        return False


def mismatches(ours: dict, theirs: dict, tolerance: dict | None = None) -> list[str]:
    """Where the refiner's logits and the video predictor's differ beyond `tolerance` (default BATCHED; empty: they
    agree)."""
    tolerance = BATCHED if tolerance is None else tolerance
    found = []
    for key in sorted(ours):
        if not torch.allclose(ours[key], theirs[key], **tolerance):
            found.append(f"object {key[0]} slice {key[1]}: max |diff| {(ours[key] - theirs[key]).abs().max():.3g}")
    return found


def compare(case, references, name: str) -> list[str]:
    if name == "walk":
        return mismatches(refiner_walk(case)[0], references["walk"])
    if name == "walk_each_object_alone":
        # sam2 1.1.0's video predictor runs each object on its own: its results do not depend on the other object
        return [problem for k in range(len(CLASSES))
                for problem in mismatches(refiner_walk(case, kept=[k])[0], references["walk"], EXACT)]
    if name == "corrections":
        expected, _ = references["corrections"]
        return mismatches(refiner_walk(case, CORRECTING, correct=True)[0], expected)
    if name == "first_slice_box_and_mask":
        return mismatches(refiner_first_slice(case), references["first_slice_box_and_mask"], EXACT)
    with absent_on_slice(case, ABSENT_SLICE):
        ours = refiner_walk(case, dataclasses.replace(SAM2_BEHAVIOUR, presence_from_prompts=True))[0]
    theirs = dict(references["absent_from_memory"])
    # where an object is absent the refiner's logit is ABSENT_LOGIT, SAM 2's NO_OBJ_SCORE (refinement.py)
    found = []
    for k in range(len(CLASSES)):
        if not (torch.all(ours.pop((k, ABSENT_SLICE)) == ABSENT_LOGIT) and
                torch.all(theirs.pop((k, ABSENT_SLICE)) == NO_OBJ_SCORE)):
            found.append(f"object {k} slice {ABSENT_SLICE}: not absent in both")
    return found + mismatches(ours, theirs)


COMPARISONS = ("walk", "walk_each_object_alone", "corrections", "absent_from_memory", "first_slice_box_and_mask")


@pytest.mark.parametrize("name", COMPARISONS)
def test_the_refiner_reproduces_the_video_predictor_from_an_nnunet_volume(case, references, name):
    assert compare(case, references, name) == []


def test_the_comparisons_see_what_they_claim(case, references):
    """Slice 0 is segmented from its boxes (both objects present, logits of order 1-10), the later slices track
    both objects, and the forced absence shows in the output of its slice."""
    walk = references["walk"]
    for k in range(len(CLASSES)):
        assert (walk[k, 0] > 0).any() and 1 < walk[k, 0].abs().max() < 100
        assert all((walk[k, d] > 0).any() for d in range(1, NUM_SLICES))
    absent = references["absent_from_memory"]
    assert all((absent[k, ABSENT_SLICE] == NO_OBJ_SCORE).all() for k in range(len(CLASSES)))
    # the absent slice's memory reaches the slices after it
    assert not torch.allclose(absent[0, ABSENT_SLICE + 1], walk[0, ABSENT_SLICE + 1], atol=1e-2)


# --- negative controls ---

def _box_height_width_swap(monkeypatch):
    original = prompts_module.boxes_to_square_frame
    monkeypatch.setattr(prompts_module, "boxes_to_square_frame",
                        lambda boxes, image_hw, size: original(boxes, tuple(image_hw)[::-1], size))


def _click_x_y_swap(monkeypatch):
    original = error_clicks.points_to_square_frame
    monkeypatch.setattr(error_clicks, "points_to_square_frame",
                        lambda points, image_hw, size: original(points.flip(-1), image_hw, size))


def _memory_one_frame_early(monkeypatch):
    original = MemoryBank.add
    monkeypatch.setattr(MemoryBank, "add", lambda self, frame, memory, conditioning: original(
        self, frame if conditioning else frame - 1, memory, conditioning))


def _non_conditioning_memories_dropped(monkeypatch):
    original = MemoryBank.add
    monkeypatch.setattr(MemoryBank, "add", lambda self, frame, memory, conditioning: original(
        self, frame, memory, conditioning) if conditioning else None)


def _bf16_memory_storage_removed(monkeypatch):
    monkeypatch.setattr(refinement, "EVALUATION_MEMORY_DTYPE", torch.float32)


def _wrong_intensity_window(monkeypatch):
    original = network_module.slices_to_sam_frames
    monkeypatch.setattr(network_module, "slices_to_sam_frames",
                        lambda image, size, windows: original(image, size, [[-4.0, 4.0] for _ in windows]))


def _objects_remembered_as_present(monkeypatch):
    monkeypatch.setattr(refinement, "_remembered_present", lambda present, prompted, low_res: torch.ones_like(present))


def _slices_walked_in_reverse(monkeypatch):
    original = SliceWalk.__init__

    def reversed_walk(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.order = self.order[:1] + self.order[1:][::-1]  # from the conditioning slice 0 to the last, then back

    monkeypatch.setattr(SliceWalk, "__init__", reversed_walk)


def _mask_prompt_transposed(monkeypatch):
    original = prompts_module.masks_to_prompt_logits
    monkeypatch.setattr(prompts_module, "masks_to_prompt_logits",
                        lambda masks, size: original(masks, size).transpose(-1, -2))


# each planted bug and the comparison that must catch it (the one the module docstring names)
PLANTED_BUGS = {"box_height_width_swap": (_box_height_width_swap, "walk"),
                "click_x_y_swap": (_click_x_y_swap, "corrections"),
                "memory_one_frame_early": (_memory_one_frame_early, "walk"),
                "non_conditioning_memories_dropped": (_non_conditioning_memories_dropped, "walk"),
                "bf16_memory_storage_removed": (_bf16_memory_storage_removed, "walk_each_object_alone"),
                "wrong_intensity_window": (_wrong_intensity_window, "walk"),
                "objects_remembered_as_present": (_objects_remembered_as_present, "absent_from_memory"),
                "slices_walked_in_reverse": (_slices_walked_in_reverse, "walk"),
                "mask_prompt_transposed": (_mask_prompt_transposed, "first_slice_box_and_mask")}


def test_the_docstring_lists_every_planted_bug_with_its_comparison():
    listed = {line[2:line.index(":")]: line for line in __doc__.splitlines() if line.startswith("- ") and ":" in line}
    assert set(listed) == set(PLANTED_BUGS)
    for bug, (_, comparison) in PLANTED_BUGS.items():
        assert listed[bug].rstrip().endswith(f": {comparison}."), listed[bug]


@pytest.mark.parametrize("bug", sorted(PLANTED_BUGS))
def test_planted_bug_breaks_the_comparison(case, references, monkeypatch, bug):
    plant, comparison = PLANTED_BUGS[bug]
    plant(monkeypatch)
    assert compare_or_error(case, references, comparison), \
        f"planted bug {bug!r} passes the {comparison!r} comparison: a blind spot"


def compare_or_error(case, references, name: str) -> list[str]:
    """`compare`, with an error counted as a difference (a planted bug may also break the path outright)."""
    try:
        return compare(case, references, name)
    except Exception as error:  # noqa: BLE001 - any failure of the path is a detected difference
        return [f"{type(error).__name__}: {error}"]


def print_effects() -> None:
    """The largest logit change of each planted bug in every comparison (the figures of the module's docstring):
    `python3 tests/test_fidelity_path.py`."""
    import tempfile
    from pathlib import Path

    torch.set_num_threads(1)
    case = build_case()
    references = build_references(case, lambda name: Path(tempfile.mkdtemp(prefix=name)))
    global BATCHED, EXACT
    BATCHED = EXACT = dict(atol=0.0, rtol=0.0)  # every difference counts: report the largest

    def largest(name: str) -> str:
        found = compare_or_error(case, references, name)
        sizes = [float(line.rsplit(" ", 1)[-1]) for line in found if "|diff|" in line]
        return f"{max(sizes):.2g}" if sizes else ("0" if not found else found[0][:40])

    print("bug".ljust(36) + "".join(name.ljust(26) for name in COMPARISONS))
    print("(none)".ljust(36) + "".join(largest(name).ljust(26) for name in COMPARISONS))
    for bug, (plant, _) in PLANTED_BUGS.items():
        with pytest.MonkeyPatch.context() as monkeypatch:
            plant(monkeypatch)
            print(bug.ljust(36) + "".join(largest(name).ljust(26) for name in COMPARISONS))


if __name__ == "__main__":
    print_effects()
