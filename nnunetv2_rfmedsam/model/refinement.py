"""One refinement pass: the slices of a patch run through SAM 2 as the frames of a video.

Every (batch item, class) pair is one SAM 2 object; the N = B * K objects of a slice are batched in SAM 2's
batch dimension (object n is batch item n // K, class n % K). The image encoder runs once per slice
(`encode_slices`), and its features serve every object and every pass.

With memory, slice 0 is the initial conditioning frame and each later slice is conditioned, through memory
attention, on slice 0's memory and on the memories and object pointers of the slices before it, the way
SAM 2's video predictor tracks. Unlike in video tracking, every slice also has its own prompts (in training,
some go without: see below): memory adds the context of the slices before it. Without memory (an ablation),
every slice is processed like an initial frame: `no_mem_embed` is added to its features and no memories are
written.

Object presence comes from the prompts (`ObjectPrompts.present`: a box, or in training a positive click). An
object absent from a slice gets no box (its point slots are padding) and whatever SAM 2 computes for it there
is replaced: its output is the constant ABSENT_LOGIT, and its memory for later slices says "absent" exactly as
SAM 2 writes an object it scores as not visible: mask logits NO_OBJ_SCORE, a negative object score (so the
memory encoder adds `no_obj_embed_spatial`), and `no_obj_ptr` as its object pointer. A present object's memory
is SAM 2's usual one, encoded from its predicted mask, with a positive object score.

Unprompted slices (`ObjectPrompts.unprompted`, in training only: see `drop_training_prompts`) are segmented as
SAM 2's video predictor segments frames without prompts: from memory alone, SAM 2 itself deciding whether each
object is there. That is how an interactive session (interactive/propagation.py) segments the slices a person
did not prompt, so training covers it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_base import NO_OBJ_SCORE, SAM2Base

from nnunetv2_rfmedsam.model.prompts import ObjectPrompts

# the logit of a class on a slice where it has no prompt: background after nnU-Net's softmax, yet finite
ABSENT_LOGIT = -20.0
# object-score logits written into memory for present / absent objects (the values SAM 2 uses for masks
# given as output, `SAM2Base._use_mask_as_output`)
PRESENT_SCORE, ABSENT_SCORE = 10.0, -10.0


@dataclass
class SliceFeatures:
    """SAM 2 image features of every slice of B patches, flattened as SAM 2 keeps them: per feature level
    (H_l * W_l, B * D, C_l), image b * D + d being slice d of patch b."""

    vision_feats: list[torch.Tensor]
    vision_pos_embeds: list[torch.Tensor]
    feat_sizes: list[tuple[int, int]]
    num_slices: int

    def for_objects(self, slice_index: int, num_objects: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The features of one slice, repeated for each of the N objects (N a multiple of B)."""
        batch_size = self.vision_feats[0].shape[1] // self.num_slices
        per_image = num_objects // batch_size
        images = torch.arange(batch_size, device=self.vision_feats[0].device).repeat_interleave(per_image)
        images = images * self.num_slices + slice_index
        return [x[:, images] for x in self.vision_feats], [x[:, images] for x in self.vision_pos_embeds]


def encode_slices(sam_model: SAM2Base, frames: torch.Tensor, num_slices: int) -> SliceFeatures:
    """Run SAM 2's image encoder once on frames (B * D, 3, S, S), ordered patch-major."""
    backbone_out = sam_model.forward_image(frames)
    _, vision_feats, vision_pos_embeds, feat_sizes = sam_model._prepare_backbone_features(backbone_out)
    return SliceFeatures(vision_feats, vision_pos_embeds, feat_sizes, num_slices)


class SliceLogits(NamedTuple):
    low_res: torch.Tensor  # (N, D, S/4, S/4) SAM 2's mask logits
    patch: torch.Tensor    # (N, D, H, W) the same, resized to the patch grid
    # both are ABSENT_LOGIT where the object is absent


def logits_to_grid(low_res: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """SAM 2's low-resolution mask logits (..., S/4, S/4) resized to a slice grid (..., H, W)."""
    lead = low_res.shape[:-2]
    flat = low_res.reshape(1, -1, *low_res.shape[-2:])
    # antialiasing matters where S/4 exceeds the patch grid (large S, small structures' patches)
    resized = F.interpolate(flat, size=tuple(grid_hw), mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(*lead, *grid_hw)


def encode_slice_memory(sam_model: SAM2Base, frame_out: dict, vision_feats: list[torch.Tensor],
                        feat_sizes: list[tuple[int, int]], point_inputs: dict | None, high_res: torch.Tensor,
                        obj_ptr: torch.Tensor, present: torch.Tensor) -> None:
    """Write one slice's memory and object pointer into `frame_out` (SAM 2's per-frame output dict), saying
    "absent" for the objects where `present` (N,) is False (see the module docstring)."""
    frame_out["obj_ptr"] = torch.where(present[:, None], obj_ptr, sam_model.no_obj_ptr)
    sam_model._encode_memory_in_output(
        vision_feats, feat_sizes, point_inputs, run_mem_encoder=True,
        high_res_masks=torch.where(present[:, None, None, None], high_res, NO_OBJ_SCORE),
        object_score_logits=torch.where(present[:, None], PRESENT_SCORE, ABSENT_SCORE),
        current_out=frame_out)


def refine_slices(sam_model: SAM2Base, features: SliceFeatures, prompts: ObjectPrompts, use_memory: bool,
                  patch_hw: tuple[int, int]) -> SliceLogits:
    """SAM 2's mask logits for every object on every slice, given the prompts (see the module docstring)."""
    num_objects, num_slices = prompts.present.shape
    memory_bank = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    low_res_per_slice, present_per_slice = [], []
    for d in range(num_slices):
        vision_feats, vision_pos_embeds = features.for_objects(d, num_objects)
        point_inputs = prompts.point_inputs(d)
        frame_out, sam_outputs, _, _ = sam_model._track_step(
            frame_idx=d, is_init_cond_frame=(d == 0 or not use_memory), current_vision_feats=vision_feats,
            current_vision_pos_embeds=vision_pos_embeds, feat_sizes=features.feat_sizes,
            point_inputs=point_inputs, mask_inputs=prompts.mask_inputs(d), output_dict=memory_bank,
            num_frames=num_slices, track_in_reverse=False, prev_sam_mask_logits=None)
        _, _, _, low_res, high_res, obj_ptr, object_score = sam_outputs
        if d in prompts.unprompted:
            # as SAM 2's tracking decides: its object score says whether the object is there (SAM 2 has then
            # already set the mask of an absent object to NO_OBJ_SCORE), and its mask where
            present = object_score[:, 0] > 0
        else:
            present = prompts.present[:, d]
        low_res = torch.where(present[:, None, None, None], low_res, ABSENT_LOGIT)
        low_res_per_slice.append(low_res)
        present_per_slice.append(present)
        if use_memory and d < num_slices - 1:  # the last slice's memory would have no reader
            # an unprompted object whose mask is empty is written as absent, as the interactive session does
            remembered = present & (low_res > 0).flatten(1).any(dim=1) if d in prompts.unprompted else present
            encode_slice_memory(sam_model, frame_out, vision_feats, features.feat_sizes, point_inputs, high_res,
                                obj_ptr, remembered)
            memory_bank["cond_frame_outputs" if d == 0 else "non_cond_frame_outputs"][d] = frame_out

    low_res = torch.cat(low_res_per_slice, dim=1)  # (N, D, S/4, S/4)
    patch = logits_to_grid(low_res, patch_hw)
    # resampling a constant is only nearly constant in floating point: restore it exactly
    patch = torch.where(torch.stack(present_per_slice, dim=1)[:, :, None, None], patch, ABSENT_LOGIT)
    return SliceLogits(low_res=low_res, patch=patch)
