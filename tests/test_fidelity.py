"""The contract with every user who loads an official SAM 2 checkpoint: with shared weights, the refiner's path
reproduces sam2's own SAM2ImagePredictor and SAM2VideoPredictor.

No official weights exist here, so one SAM 2.1 tiny model is built with random weights; the refiner's adapted
copy (adapters at their identity start) and sam2's predictors get the same weights, the same frames (real
hippocampus MRI slices, made into the frames the predictors themselves load) and the same prompts, and their
mask logits must agree. Where the refiner deliberately differs from SAM 2 (model/departures.py), the tests
switch it to SAM 2's behaviour: SAM2ImagePredictor never reads the object score, which is the refiner's default
on prompted slices (REFINER); SAM2VideoPredictor lets the object-score head decide on every frame
(SAM2_BEHAVIOUR).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from PIL import Image
from sam2.build_sam import build_sam2_video_predictor
from sam2.sam2_image_predictor import SAM2ImagePredictor

from nnunetv2_rfmedsam.model.adapters import adapter_parameter_names, inject_adapters
from nnunetv2_rfmedsam.model.departures import REFINER, SAM2_BEHAVIOUR
from nnunetv2_rfmedsam.model.prompts import NEGATIVE_CLICK, NOT_A_POINT, POSITIVE_CLICK, ObjectPrompts
from nnunetv2_rfmedsam.model.refinement import encode_slices, refine_slices
from nnunetv2_rfmedsam.model.sam2_model import build_sam2_model, sam2_hydra_overrides
from nnunetv2_rfmedsam.raw_dataset import hippocampus_source, list_cases
from nnunetv2_rfmedsam.settings import SAM2_MODELS

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# float32 on the CPU: the refiner and sam2's predictors run the same operations and agree to the bit (measured);
# the smallest planted bug of tests/test_fidelity_path.py moves a logit by 3.6e-4
TOLERANCE = dict(atol=1e-6, rtol=0)


def hippocampus_slices(size: int, count: int) -> np.ndarray:
    """`count` consecutive real MRI slices through the hippocampus, as uint8 RGB frames (count, size, size, 3)."""
    source = hippocampus_source()
    case = list_cases(source)[0]
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / f"{case}_0000.nii.gz")))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz")))
    middle = int(np.nonzero(label.any(axis=(1, 2)))[0].mean())
    volume = volume.astype(np.float32)
    volume = (volume - volume.min()) / (volume.max() - volume.min()) * 255
    frames = []
    for d in range(middle, middle + count):
        image = Image.fromarray(volume[d].astype(np.uint8)).resize((size, size), Image.BILINEAR)
        frames.append(np.repeat(np.asarray(image)[..., None], 3, axis=2))
    return np.stack(frames)


def shared_models(size: int):
    """The refiner's adapted SAM 2 and a plain SAM 2 with the same random weights, both in evaluation mode."""
    torch.manual_seed(0)
    adapted = build_sam2_model("tiny", size)
    inject_adapters(adapted, 32)
    plain = build_sam2_model("tiny", size)
    adapters = adapter_parameter_names(adapted)
    plain.load_state_dict({k: v for k, v in adapted.state_dict().items() if k not in adapters})
    return adapted.eval(), plain.eval()


def image_predictor(plain, size: int) -> SAM2ImagePredictor:
    predictor = SAM2ImagePredictor(plain)
    # the predictor's backbone feature sizes are written for 1024 inputs
    predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    return predictor


def one_object(size: int, box=None, points=(), mask_logits=None, num_slices=1, unprompted=frozenset()):
    """ObjectPrompts of one object whose prompts are on slice 0, in SAM 2's size x size frame."""
    present = torch.zeros(1, num_slices, dtype=torch.bool)
    present[0, 0] = box is not None or any(label == POSITIVE_CLICK for _, _, label in points)
    boxes = torch.zeros(1, num_slices, 4)
    boxed = torch.zeros(1, num_slices, dtype=torch.bool)
    if box is not None:
        boxes[0, 0], boxed[0, 0] = torch.tensor(box, dtype=torch.float32), True
    clicks = labels = None
    if points:
        clicks = torch.zeros(1, num_slices, len(points), 2)
        labels = torch.full((1, num_slices, len(points)), NOT_A_POINT)
        clicks[0, 0] = torch.tensor([[x, y] for x, y, _ in points], dtype=torch.float32)
        labels[0, 0] = torch.tensor([label for _, _, label in points])
    masks = None
    if mask_logits is not None:
        masks = torch.zeros(1, num_slices, size // 4, size // 4)
        masks[0, 0] = mask_logits
    return ObjectPrompts(present=present, boxes=boxes, boxed=boxed, clicks=clicks, click_labels=labels,
                         mask_logits=masks, unprompted=unprompted)


def refiner_slice_logits(adapted, frames: torch.Tensor, prompts, departures) -> torch.Tensor:
    """The refiner's low-resolution logits (D, S/4, S/4) of one object on every frame."""
    with torch.no_grad():
        features = encode_slices(adapted, frames, frames.shape[0])
        result = refine_slices(adapted, features, prompts, use_memory=True, patch_hw=frames.shape[-2:],
                               departures=departures)
    return result.low_res[0]


def upsampled(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """As both predictors return masks at the frame size (here the frames' own size)."""
    return F.interpolate(low_res[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


# --- one slice: SAM2ImagePredictor ---

BOX = (50.0, 60.0, 150.0, 170.0)  # in a 224 frame


@pytest.fixture(scope="module", params=[224, 256, 1024])
def image_case(request):
    size = request.param
    adapted, plain = shared_models(size)
    predictor = image_predictor(plain, size)
    frame = hippocampus_slices(size, 1)[0]
    predictor.set_image(frame)
    return size, adapted, predictor, predictor._transforms(frame)[None]


def scaled(values, size):
    return tuple(v * size / 224 for v in values)


def test_box_prompt_matches_the_image_predictor(image_case):
    size, adapted, predictor, frames = image_case
    box = scaled(BOX, size)
    expected, _, _ = predictor.predict(box=np.array(box), multimask_output=False, return_logits=True)
    ours = refiner_slice_logits(adapted, frames, one_object(size, box=box), REFINER)
    torch.testing.assert_close(upsampled(ours, size)[0], torch.from_numpy(expected[0]), **TOLERANCE)


def test_positive_and_negative_points_match_the_image_predictor(image_case):
    size, adapted, predictor, frames = image_case
    points = [(*scaled((100.0, 110.0), size), POSITIVE_CLICK), (*scaled((60.0, 70.0), size), NEGATIVE_CLICK)]
    expected, _, _ = predictor.predict(point_coords=np.array([p[:2] for p in points]),
                                       point_labels=np.array([p[2] for p in points]), multimask_output=False,
                                       return_logits=True)
    ours = refiner_slice_logits(adapted, frames, one_object(size, points=points), REFINER)
    torch.testing.assert_close(upsampled(ours, size)[0], torch.from_numpy(expected[0]), **TOLERANCE)


def test_one_click_takes_sam2s_best_of_three_masks(image_case):
    """SAM 2's rule: one point (or none) gets the three-mask output, the best by predicted IoU."""
    size, adapted, predictor, frames = image_case
    point = (*scaled((100.0, 110.0), size), POSITIVE_CLICK)
    masks, ious, _ = predictor.predict(point_coords=np.array([point[:2]]), point_labels=np.array([1]),
                                       multimask_output=True, return_logits=True)
    ours = refiner_slice_logits(adapted, frames, one_object(size, points=[point]), REFINER)
    torch.testing.assert_close(upsampled(ours, size)[0], torch.from_numpy(masks[ious.argmax()]), **TOLERANCE)


def test_box_with_mask_prompt_matches_the_image_predictor(image_case):
    size, adapted, predictor, frames = image_case
    box = scaled(BOX, size)
    generator = torch.Generator().manual_seed(1)
    mask_logits = 10 * torch.randn(size // 4, size // 4, generator=generator).clamp(-1, 1)
    expected, _, _ = predictor.predict(box=np.array(box), mask_input=mask_logits[None].numpy(),
                                       multimask_output=False, return_logits=True)
    ours = refiner_slice_logits(adapted, frames, one_object(size, box=box, mask_logits=mask_logits), REFINER)
    torch.testing.assert_close(upsampled(ours, size)[0], torch.from_numpy(expected[0]), **TOLERANCE)


# --- a sequence of slices with memory: SAM2VideoPredictor ---

NUM_SLICES = 6


@pytest.fixture(scope="module")
def video_case(tmp_path_factory):
    """Shared weights, the video predictor, and its frames: six real slices as JPEG files (what it loads)."""
    size = 224
    adapted, plain = shared_models(size)
    # shared random weights score every slice present by a small margin; shifting the object-score head's bias
    # (in both models) makes SAM 2 score the boxed first slice absent (-0.017) and the later ones present
    # (+0.013), so the comparison covers both of SAM 2's presence paths and its "absent" memory
    for model in (adapted, plain):
        with torch.no_grad():
            model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias -= 0.15
    predictor = build_sam2_video_predictor(SAM2_MODELS["tiny"][0], ckpt_path=None, device="cpu", mode="eval",
                                           hydra_overrides_extra=sam2_hydra_overrides(size),
                                           apply_postprocessing=False)
    predictor.load_state_dict(plain.state_dict())
    folder = tmp_path_factory.mktemp("frames")
    for d, frame in enumerate(hippocampus_slices(size, NUM_SLICES)):
        Image.fromarray(frame).save(folder / f"{d:05d}.jpg", quality=95)
    return size, adapted, predictor, folder


def propagate_like_the_video_predictor(video_case, boxes: dict[int, tuple]):
    """(the video predictor's masks per slice, the refiner's in SAM 2's behaviour, the frames), with `boxes` on
    their slices given before propagating, as a user of the video predictor gives them."""
    size, adapted, predictor, folder = video_case
    with torch.inference_mode():
        state = predictor.init_state(video_path=str(folder))
        for d, box in boxes.items():
            predictor.add_new_points_or_box(state, frame_idx=d, obj_id=1, box=np.array(box))
        expected = {d: masks[0, 0].clone().float() for d, _, masks in predictor.propagate_in_video(state)}
    assert sorted(expected) == list(range(NUM_SLICES))
    # the refiner gets the very tensors the video predictor loaded
    frames = state["images"].clone()
    prompts = one_object(size, num_slices=NUM_SLICES, unprompted=frozenset(range(NUM_SLICES)) - set(boxes))
    for d, box in boxes.items():
        prompts.present[0, d], prompts.boxed[0, d] = True, True
        prompts.boxes[0, d] = torch.tensor(box)
    ours = upsampled(refiner_slice_logits(adapted, frames, prompts, SAM2_BEHAVIOUR), size)
    return expected, ours, frames, prompts


def test_box_on_the_first_slice_propagates_like_the_video_predictor(video_case):
    expected, ours, frames, prompts = propagate_like_the_video_predictor(video_case, {0: BOX})
    for d in range(NUM_SLICES):
        torch.testing.assert_close(ours[d], expected[d], **TOLERANCE, msg=f"slice {d}")
    assert (expected[0] < -1000).all() and (expected[1] > -1000).any()  # absent, then present from memory
    # the refiner's own rule (the box says the object is on slice 0) departs from this, as departures.py says
    size, adapted = video_case[:2]
    departing = upsampled(refiner_slice_logits(adapted, frames, prompts, REFINER), size)
    assert not torch.allclose(departing[0], ours[0]) and not torch.allclose(departing[1], ours[1], **TOLERANCE)


def test_boxes_on_two_slices_are_two_conditioning_frames_like_the_video_predictor(video_case):
    """Prompts given on slices 0 and 3 before propagating: SAM 2 segments both from their prompts alone and every
    other slice attends to both (the refiner's memory layout, which departs from this, is switched off)."""
    later_box = (60.0, 70.0, 160.0, 180.0)
    expected, ours, frames, prompts = propagate_like_the_video_predictor(video_case, {0: BOX, 3: later_box})
    for d in range(NUM_SLICES):
        torch.testing.assert_close(ours[d], expected[d], **TOLERANCE, msg=f"slice {d}")
    size, adapted = video_case[:2]
    layout_only = dataclasses.replace(SAM2_BEHAVIOUR, prompted_slices_use_memory=True)
    departing = upsampled(refiner_slice_logits(adapted, frames, prompts, layout_only), size)
    torch.testing.assert_close(departing[0], ours[0], **TOLERANCE)  # the first slice reads no memory either way
    # the refiner's slice 3 reads the memories before it; SAM 2's slices 1 and 2 also attend to slice 3's
    # conditioning frame (a small change with random weights, but a change)
    with torch.no_grad():
        features = encode_slices(adapted, frames, NUM_SLICES)
        scores = [refine_slices(adapted, features, prompts, True, frames.shape[-2:], departures).object_scores[0, 3]
                  for departures in (SAM2_BEHAVIOUR, layout_only)]
    assert not torch.allclose(*scores, atol=1e-3)  # slice 3 itself (both score it absent: compare the scores)
    assert not torch.equal(departing[1], ours[1]) and not torch.equal(departing[2], ours[2])


def test_pass_two_corrects_each_slice_like_a_click_in_the_video_predictor(video_case):
    """The refinement passes' walk (model/refinement.py SliceWalk): on each slice pass 1 is tracked, then pass 2
    corrects it against the same memory, and the corrected result is what later slices remember. In the video
    predictor that is: track a frame, click on it (the click plus the frame's previous logits as SAM 2's mask
    input), move on to the next frame. A box starts slice 0; later slices are tracked from memory, then clicked."""
    from nnunetv2_rfmedsam.model.refinement import SliceWalk
    size, adapted, predictor, folder = video_case
    clicks = {d: ((100.0, 115.0, POSITIVE_CLICK) if d % 2 == 0 else (70.0, 80.0, NEGATIVE_CLICK))
              for d in range(NUM_SLICES)}
    tracked, corrected = {}, {}
    with torch.inference_mode():
        state = predictor.init_state(video_path=str(folder))
        _, _, masks = predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, box=np.array(BOX))
        tracked[0] = masks[0, 0].clone().float()
        for d in range(NUM_SLICES):
            if d > 0:
                for frame, _, masks in predictor.propagate_in_video(state, start_frame_idx=d, max_frame_num_to_track=0):
                    assert frame == d
                    tracked[d] = masks[0, 0].clone().float()
            x, y, label = clicks[d]
            # slice 0 keeps its box beside the click, as the refiner's pass 2 boxes its first result
            _, _, masks = predictor.add_new_points_or_box(state, frame_idx=d, obj_id=1, points=np.array([[x, y]]),
                                                          labels=np.array([label]), clear_old_points=d > 0)
            corrected[d] = masks[0, 0].clone().float()
    frames = state["images"].clone()
    # SAM 2's behaviour, except that a mask prompt goes through the decoder, as the video predictor feeds a frame's
    # previous logits back with a click
    departures = dataclasses.replace(SAM2_BEHAVIOUR, mask_prompts_through_decoder=True)
    first = one_object(size, box=BOX, num_slices=NUM_SLICES, unprompted=frozenset(range(1, NUM_SLICES)))
    ours_tracked, ours_corrected = {}, {}
    with torch.no_grad():
        features = encode_slices(adapted, frames, NUM_SLICES)
        walk = SliceWalk(adapted, NUM_SLICES, True, departures, first.unprompted)
        assert walk.in_slice_order
        for d in range(NUM_SLICES):
            out = walk.step(d, features, d, first, d, remember=False)
            # the video predictor clamps the previous logits it feeds back
            correction = one_object(size, box=BOX if d == 0 else None, points=[clicks[d]],
                                    mask_logits=out.low_res[0, 0].clamp(-32.0, 32.0))
            ours_tracked[d] = out.low_res[0]
            ours_corrected[d] = walk.step(d, features, d, correction, 0, correcting=out).low_res[0]
    for d in range(NUM_SLICES):
        torch.testing.assert_close(upsampled(ours_tracked[d], size)[0], tracked[d], **TOLERANCE, msg=f"slice {d}")
        torch.testing.assert_close(upsampled(ours_corrected[d], size)[0], corrected[d], **TOLERANCE,
                                   msg=f"corrected slice {d}")
    # the clicks changed what SAM 2 segments, and the corrected memory what later slices get
    assert not torch.allclose(corrected[2], tracked[2], **TOLERANCE)
