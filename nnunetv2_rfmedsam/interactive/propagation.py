"""One object (class) carried through a volume by SAM 2's memory, from the slices a user prompted.

Order, as SAM 2's video predictor propagates from the first frame with prompts, and in the memory layout the
refiner is trained with (model/departures.py):
- the first prompted slice is the conditioning frame: it is segmented from its own prompts alone;
- forward, from there to the last slice: every slice is conditioned through memory attention on the
  conditioning frame and on the memories of the slices just before it (`num_maskmem`); a slice with prompts
  also gets them, as SAM 2's video predictor treats a correction on a tracked frame (a non-conditioning frame),
  and as the refiner treats every stage-1-prompted slice after the first; a slice without prompts is segmented
  from memory alone;
- backward, from the first prompted slice to slice 0, with SAM 2's `track_in_reverse`: memory alone, from the
  conditioning frame and the slices just after.

Each slice runs through the refiner's own `track_slice` (model/refinement.py), so presence follows the same
rules: a slice with a box or a positive click has the object; a slice whose only prompts are negative clicks
does not (background, memory "absent"), whatever the weights; a slice without prompts has the object where
SAM 2's object-score head says so and its mask from memory has foreground.

Incremental: the result of a forward slice depends only on the prompts of the slices up to it. Prompts are
immutable objects, so `propagate_object` compares them by identity with the prompts of the previous result:
forward slices before the first changed slice are reused, the forward slices from it on and all backward
slices are computed again; nothing is computed when nothing changed. A new first prompted slice recomputes all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sam2.modeling.sam2_base import SAM2Base

from nnunetv2_rfmedsam.model.prompts import (POSITIVE_CLICK, HostLayout, ObjectPrompts, boxes_to_square_frame,
                                             points_to_square_frame)
from nnunetv2_rfmedsam.model.refinement import ABSENT_LOGIT, SliceFeatures, logits_to_grid, track_slice


@dataclass(frozen=True, eq=False)
class SlicePrompt:
    """The prompts of one object on one slice of the network grid (coordinates in its pixels, x before y).

    box:          (x0, y0, x1, y1) or None
    points:       ((x, y, label), ...) with label POSITIVE_CLICK or NEGATIVE_CLICK
    mask_logits:  (S/4, S/4) mask prompt as logits, or None
    """

    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float, int], ...] = ()
    mask_logits: torch.Tensor | None = field(default=None, repr=False)

    def object_prompts(self, slice_hw: tuple[int, int], image_size: int, device: torch.device) -> ObjectPrompts:
        """As the refiner's ObjectPrompts of one object on one slice, in SAM 2's image_size frame."""
        box = torch.tensor([self.box if self.box is not None else (0.0, 0.0, 0.0, 0.0)], device=device)
        has_box = torch.tensor([[self.box is not None]], device=device)
        clicks = labels = None
        if self.points:
            coords = torch.tensor([[p[0], p[1]] for p in self.points], dtype=torch.float32, device=device)
            clicks = points_to_square_frame(coords, slice_hw, image_size)[None, None]
            labels = torch.tensor([[[p[2] for p in self.points]]], dtype=torch.int32, device=device)
        mask = None if self.mask_logits is None else self.mask_logits.to(device)[None, None]
        # the prompts are the person's, known here: SAM 2's calls are grouped without reading the device
        layout = HostLayout(points=np.array([[2 * (self.box is not None) + len(self.points)]]),
                            absent=np.array([[not self.has_object]]))
        return ObjectPrompts(present=torch.tensor([[self.has_object]], device=device), boxed=has_box,
                             boxes=boxes_to_square_frame(box, slice_hw, image_size)[None],
                             mask_logits=mask, clicks=clicks, click_labels=labels, layout=layout)

    @property
    def has_object(self) -> bool:
        """Whether the prompts say the object is on the slice: a box or a positive click."""
        return self.box is not None or any(label == POSITIVE_CLICK for _, _, label in self.points)


@dataclass(frozen=True)
class SliceResult:
    low_res: torch.Tensor   # (S/4, S/4) SAM 2's mask logits (mask prompt of a later correction)
    logits: torch.Tensor    # (H, W) the same on the network grid
    memory: dict            # SAM 2's frame output: maskmem_features, maskmem_pos_enc, obj_ptr
    conditioning: bool      # whether the slice is the conditioning frame (the first prompted slice)


@dataclass(frozen=True)
class Track:
    """An object's result: the prompts it was computed from and every slice's result."""

    prompts: dict[int, SlicePrompt]
    results: dict[int, SliceResult]
    computed: tuple[int, ...]  # the slices computed (not reused) when this track was made, in order

    def logits(self, grid_shape: tuple[int, int, int]) -> torch.Tensor:
        """(D, H, W) logits of every slice."""
        volume = torch.full(grid_shape, ABSENT_LOGIT)
        if self.results:
            slices = sorted(self.results)
            # one transfer from the device for the whole volume
            volume[slices] = torch.stack([self.results[d].logits for d in slices]).float().cpu()
        return volume


def propagate_object(sam_model: SAM2Base, features: SliceFeatures, prompts: dict[int, SlicePrompt],
                     slice_hw: tuple[int, int], previous: Track | None = None) -> Track:
    """The object's result on every slice (see the module docstring); `previous` is reused where still valid."""
    if not prompts:
        raise ValueError("an object needs a prompt on at least one slice")
    first, num_slices = min(prompts), features.num_slices
    reusable_until = first
    if previous is not None and min(previous.prompts) == first:
        changed = [d for d in prompts.keys() | previous.prompts.keys() if prompts.get(d) is not previous.prompts.get(d)]
        if not changed:
            return previous
        reusable_until = min(changed)
    step = _SliceStep(sam_model, features, slice_hw)
    memory_bank = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    results, computed = {}, []
    forward = [(d, False) for d in range(first, num_slices)]
    backward = [(d, True) for d in range(first - 1, -1, -1)]
    for d, reverse in forward + backward:
        if not reverse and d < reusable_until:
            result = previous.results[d]
        else:
            result = step(d, prompts.get(d), memory_bank, is_initial=(d == first), reverse=reverse)
            computed.append(d)
        results[d] = result
        memory_bank["cond_frame_outputs" if result.conditioning else "non_cond_frame_outputs"][d] = result.memory
    return Track(prompts=dict(prompts), results=results, computed=tuple(computed))


class _SliceStep:
    """The refiner's `track_slice` on one slice of one object, with its memory."""

    def __init__(self, sam_model: SAM2Base, features: SliceFeatures, slice_hw: tuple[int, int]):
        self.sam, self.features, self.slice_hw = sam_model, features, tuple(slice_hw)

    def __call__(self, d: int, prompt: SlicePrompt | None, memory_bank: dict, is_initial: bool,
                 reverse: bool) -> SliceResult:
        device = self.features.compute_device
        if prompt is None:
            prompts = ObjectPrompts(present=torch.zeros(1, 1, dtype=torch.bool, device=device),
                                    boxes=torch.zeros(1, 1, 4, device=device), unprompted=frozenset({0}))
        else:
            prompts = prompt.object_prompts(self.slice_hw, self.sam.image_size, device)
        out = track_slice(self.sam, self.features, d, prompts, 0, memory_bank, is_init_cond_frame=is_initial,
                          reverse=reverse)
        low_res = out.low_res[0, 0]  # ABSENT_LOGIT where the object is absent
        return SliceResult(low_res=low_res, logits=logits_to_grid(low_res, self.slice_hw), memory=out.memory,
                           conditioning=is_initial)
