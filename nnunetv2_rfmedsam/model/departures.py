"""Where the refiner deliberately differs from SAM 2, in one place, each switchable.

Everything not named here runs as sam2 1.1.0 runs it: the refiner calls SAM 2's own `_track_step`,
`_forward_sam_heads` and `_encode_new_memory`, with SAM 2's prompt layout (a box as its two corner points,
then the clicks; only real points, so SAM 2's rule gives one or no point the three-mask output), its memory
layout for frames without prompts, and in evaluation its predictor's bfloat16 memory storage. Frames are made
as sam2's `SAM2Transforms` makes them from an image in [0, 1] (frames.py), and box and click coordinates are
scaled as sam2's predictors scale a user's pixel coordinates (x / W * S, prompts.py). tests/test_fidelity.py holds
the refiner's SAM 2 calls to SAM2ImagePredictor and SAM2VideoPredictor with shared weights, and
tests/test_fidelity_path.py the whole path from nnU-Net's preprocessed volume and a stage-1 label map, with
planted bugs that must break the comparison.

sam2's optional post-processing is not applied (the refiner builds SAM 2 with `apply_postprocessing=False`,
sam2_model.py, and the fidelity tests build sam2's predictors the same way). sam2's builders turn it on by
default; it changes three things, in evaluation only: the single-mask output may be swapped for a multimask output
judged more stable (`dynamic_multimask_via_stability`), the memory of a frame with clicks or a box is encoded
from its binarised mask instead of the sigmoid of its logits (`binarize_mask_from_pts_for_mem_enc`), and small
holes in output masks are filled (`fill_hole_area`, only with sam2's CUDA extension). Why not: the refiner is
trained, as Meta trains SAM 2, where none of these apply (each is skipped in training mode), and evaluation must
decode and remember as training did.

The departures:
- `presence_from_prompts`: on a slice where an object has prompts, the prompts say whether it is there (a box
  or a positive click: present; none, or negative clicks only: absent, logit ABSENT_LOGIT, memory "absent"),
  and SAM 2's object-score head does not overrule them by replacing the mask with NO_OBJ_SCORE. That is how
  SAM2ImagePredictor treats prompts (it never reads the object score); SAM2VideoPredictor lets the head
  decide on every frame (False). On slices without prompts the head decides either way, as in the video
  predictor. Why: a stage-1 mask is the strongest evidence of presence there is, and a head that wrongly
  scores a prompted object absent would give a constant logit and no gradient to learn from.
- `prompted_slices_use_memory`: a slice with prompts after the first is segmented from its prompts AND the
  memory of the slices before it, and stored as a non-conditioning frame, as SAM2VideoPredictor treats a
  correction on a frame it has already tracked (its default `add_all_frames_to_correct_as_cond=False`) and as
  Meta's training treats its corrected frames. SAM2VideoPredictor given prompts on several frames before it
  propagates makes each of them an initial conditioning frame instead: segmented from its prompts alone, before
  the other frames, and attended by every frame (False). Why: stage 1 prompts every slice, and with every slice a
  conditioning frame memory would neither help (no slice would read another's memory) nor stay bounded
  (`max_cond_frames_in_attn` is -1: all conditioning frames are attended).
- `mask_prompts_through_decoder`: a mask prompt (the stage-1 mask, or a pass's own result) goes through SAM 2's
  prompt encoder and mask decoder. SAM 2's packaged configs copy a mask prompt to the output unchanged
  (`use_mask_input_as_output_without_sam`: the video predictor takes a given mask as ground truth), which
  would leave nothing to refine.
Two more live in the network, as plans settings: `start_at_prompt` (the output is a learned gate between the
stage-1 mask and SAM 2's logits, starting at the mask; network.py) and the refinement passes themselves.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from sam2.modeling.sam2_base import SAM2Base


@dataclass(frozen=True)
class Departures:
    presence_from_prompts: bool = True
    prompted_slices_use_memory: bool = True
    mask_prompts_through_decoder: bool = True


# what the refiner does by default, and SAM 2's own behaviour (for the fidelity tests)
REFINER = Departures()
SAM2_BEHAVIOUR = Departures(presence_from_prompts=False, prompted_slices_use_memory=False,
                            mask_prompts_through_decoder=False)


@contextlib.contextmanager
def sam2_call_flags(sam_model: SAM2Base, departures: Departures, prompted: bool):
    """SAM 2's run-time flags for one `_track_step` call on objects that have prompts (`prompted`) or not.

    `pred_obj_scores` is read only at forward time by `_forward_sam_heads` (the heads, the object-score token
    and `no_obj_ptr` exist either way), and `use_mask_input_as_output_without_sam` only by `_track_step`."""
    saved = sam_model.pred_obj_scores, sam_model.use_mask_input_as_output_without_sam
    sam_model.pred_obj_scores = saved[0] and not (departures.presence_from_prompts and prompted)
    sam_model.use_mask_input_as_output_without_sam = not departures.mask_prompts_through_decoder
    try:
        yield
    finally:
        sam_model.pred_obj_scores, sam_model.use_mask_input_as_output_without_sam = saved
