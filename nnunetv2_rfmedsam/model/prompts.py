"""Prompts derived from masks: per-class, per-slice boxes and mask prompts in SAM 2's frame.

SAM 2 sees each slice resized to S x S without preserving the aspect ratio (as its video predictor loads
frames), so prompts are scaled per axis from the patch grid (H, W) to S x S. Coordinates are pixel indices
(x, y), scaled as sam2's predictors scale the coordinates a user gives them (`SAM2Transforms.transform_coords`,
`SAM2VideoPredictor.add_new_points_or_box`: x / W * S, y / H * S), so a box or click reaches SAM 2's prompt
encoder where it would through sam2's own predictors given the slice as an image.

Plain torch, no SAM 2: the label values below are SAM's prompt-encoder conventions.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NEGATIVE_CLICK, POSITIVE_CLICK, NOT_A_POINT = 0, 1, -1
# a box is given to SAM 2 as two points: its top-left and bottom-right corners
BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 2, 3
# binary masks become mask prompts of +-10 logits, as SAM 2 writes masks given as output
# (`SAM2Base._use_mask_as_output`); its own low-resolution logits, the second pass's prompts, have that scale
MASK_PROMPT_LOGIT = 10.0
# SAM's mask prompts (and low-resolution output masks) are 4 times coarser than its input frame
MASK_PROMPT_STRIDE = 4
# the largest box jitter, as a fraction of the image's side: SAM 2 trains with at most 20 pixels of its 1024 frame
BOX_NOISE_BOUND = 20 / 1024


def boxes_from_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes of 2-D masks.

    masks: (..., H, W), 0/1 floats or booleans; typically (N, K, H, W), one slice per N and one class per K.
    Returns boxes (..., 4) as (x0, y0, x1, y1) pixel indices, inclusive, and `present` (...): whether the
    mask has any foreground. Where it has none, the box is all zeros.
    """
    foreground = masks > 0.5
    rows = foreground.any(dim=-1)  # (..., H)
    cols = foreground.any(dim=-2)  # (..., W)
    present = rows.any(dim=-1)
    # argmax needs numbers; it returns the first maximum: the first foreground row/column from either side
    rows, cols = rows.to(torch.uint8), cols.to(torch.uint8)
    height, width = masks.shape[-2:]
    y0 = rows.argmax(dim=-1)
    y1 = height - 1 - rows.flip(-1).argmax(dim=-1)
    x0 = cols.argmax(dim=-1)
    x1 = width - 1 - cols.flip(-1).argmax(dim=-1)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1).float()
    return boxes * present.unsqueeze(-1), present


def jitter_boxes(boxes: torch.Tensor, present: torch.Tensor, fraction: float, image_hw: tuple[int, int],
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Move each edge of each present box by a uniform random amount of up to `fraction` of the box's side
    (its extent in pixels along that axis), and at most BOX_NOISE_BOUND of the image's side, then clip to the
    image. Absent boxes are returned unchanged.

    SAM 2's training does the same (`sam2_utils.sample_box_points`: noise 0.1 of the side, bounded by 20 pixels
    of its 1024 frame); the bound is kept as that fraction of the frame, whatever the frame's size."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    height, width = image_hw
    bounds = boxes.new_tensor([width, height] * 2) * BOX_NOISE_BOUND
    sides = torch.stack([x1 - x0 + 1, y1 - y0 + 1] * 2, dim=-1)
    shifts = (2 * torch.rand(boxes.shape, generator=generator, device=boxes.device) - 1) * torch.minimum(
        fraction * sides, bounds)
    jx0, jy0, jx1, jy1 = (boxes + shifts).unbind(-1)
    # large fractions can swap two edges: keep the box's corners ordered
    jittered = torch.stack([torch.minimum(jx0, jx1).clamp(0, width - 1), torch.minimum(jy0, jy1).clamp(0, height - 1),
                            torch.maximum(jx0, jx1).clamp(0, width - 1), torch.maximum(jy0, jy1).clamp(0, height - 1)],
                           dim=-1)
    return torch.where(present.unsqueeze(-1), jittered, boxes)


def points_to_square_frame(points: torch.Tensor, image_hw: tuple[int, int], size: int) -> torch.Tensor:
    """Points (..., 2) as (x, y) pixel indices of an (H, W) grid -> coordinates in that grid resized to
    size x size, in sam2's convention (x / W * size, y / H * size; see the module docstring)."""
    height, width = image_hw
    # in sam2's order of operations (divide, then multiply), so that the float32 coordinates are sam2's to the bit;
    # by Python numbers, which reach the device without a transfer
    return torch.stack((points[..., 0] / width, points[..., 1] / height), dim=-1) * size


def boxes_to_square_frame(boxes: torch.Tensor, image_hw: tuple[int, int], size: int) -> torch.Tensor:
    """Boxes (..., 4) in pixel indices of an (H, W) grid -> pixel indices of that grid resized to size x size."""
    corners = boxes.reshape(*boxes.shape[:-1], 2, 2)
    return points_to_square_frame(corners, image_hw, size).reshape(boxes.shape)


def masks_to_prompt_logits(masks: torch.Tensor, size: int) -> torch.Tensor:
    """0/1 masks (..., H, W) -> mask-prompt logits (..., size, size) of +-MASK_PROMPT_LOGIT (fractions in
    between at resampled edges)."""
    lead = masks.shape[:-2]
    resized = F.interpolate(masks.reshape(-1, 1, *masks.shape[-2:]).float(), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=True)
    return ((2 * resized - 1) * MASK_PROMPT_LOGIT).reshape(*lead, size, size)


@dataclass(frozen=True)
class HostLayout:
    """What Python needs to group the objects of a slice for SAM 2 (refinement.py), known on the host so that no
    slice reads it back from the device: per object (N) and slice (D), the number of real points (box corners and
    clicks) and whether the prompts leave the object absent. `presence_on_device`: an object counted as present
    may be absent by its prompts on the device (a next pass's prompts, made there from this pass's masks); it then
    runs with the others, and its output and memory are replaced as an absent object's are."""

    points: np.ndarray  # (N, D) int
    absent: np.ndarray  # (N, D) bool
    presence_on_device: bool = False

    @classmethod
    def of_boxes(cls, present: np.ndarray, presence_on_device: bool = False) -> "HostLayout":
        """Objects with a box (two corners) where `present` (N, D), no clicks."""
        return cls(points=2 * present.astype(np.int64), absent=~present, presence_on_device=presence_on_device)

    def columns(self, start: int, stop: int) -> "HostLayout":
        return HostLayout(self.points[:, start:stop], self.absent[:, start:stop], self.presence_on_device)

    def rows(self, objects: np.ndarray) -> "HostLayout":
        return HostLayout(self.points[objects], self.absent[objects], self.presence_on_device)


@dataclass
class ObjectPrompts:
    """The prompts of N objects (one per batch item and class) on each of D slices, in SAM 2's S x S frame.

    present:      (N, D) bool; where False the object is absent from the slice: it gets no prompt and its
                  output there is background (see refinement.py)
    boxes:        (N, D, 4) x0, y0, x1, y1, used where `boxed`
    mask_logits:  (N, D, S/4, S/4) mask prompts as logits, or None for no mask prompt
    clicks:       (N, D, P, 2) extra points (x, y), or None; `click_labels` (N, D, P) holds POSITIVE_CLICK,
                  NEGATIVE_CLICK or NOT_A_POINT (padding) for each
    boxed:        (N, D) bool, where the box is given; None means wherever present (a positive click can
                  make an object present on a slice that has no box)
    unprompted:   slices without any prompt for any object: SAM 2 segments them from memory alone and decides
                  itself whether each object is there (`present` does not apply; see refinement.py)
    unmasked:     slices without a mask prompt for any object (SAM's prompt encoder takes masks for all objects
                  of a batch or for none)
    layout:       the grouping's host copy (HostLayout), or None: then each slice reads it from the device
    """

    present: torch.Tensor
    boxes: torch.Tensor
    mask_logits: torch.Tensor | None = None
    clicks: torch.Tensor | None = None
    click_labels: torch.Tensor | None = None
    boxed: torch.Tensor | None = None
    unprompted: frozenset[int] = frozenset()
    unmasked: frozenset[int] = frozenset()
    layout: HostLayout | None = None

    def slice_points(self, slice_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every object's points on one slice: coordinates (N, 2 + P, 2) and labels (N, 2 + P), the box corners
        (NOT_A_POINT where there is no box), then the clicks. refinement.py gives SAM 2 only the real ones."""
        boxed = (self.present if self.boxed is None else self.boxed)[:, slice_index, None]
        coords = self.boxes[:, slice_index].reshape(-1, 2, 2)
        corners = torch.arange(BOX_TOP_LEFT, BOX_BOTTOM_RIGHT + 1, device=boxed.device)  # made on the device
        labels = torch.where(boxed, corners, NOT_A_POINT)
        if self.clicks is not None:
            coords = torch.cat([coords, self.clicks[:, slice_index]], dim=1)
            labels = torch.cat([labels, self.click_labels[:, slice_index].to(labels.dtype)], dim=1)
        return coords.float(), labels

    def mask_inputs(self, slice_index: int) -> torch.Tensor | None:
        """SAM 2's `mask_inputs` on one slice: (N, 1, S/4, S/4) logits, or None."""
        if self.mask_logits is None or slice_index in self.unprompted or slice_index in self.unmasked:
            return None
        return self.mask_logits[:, slice_index, None]


def prompts_from_masks(masks: torch.Tensor, image_size: int, mask_logits: torch.Tensor | None = None,
                       jitter: float = 0.0, generator: torch.Generator | None = None,
                       layout: HostLayout | None = None) -> ObjectPrompts:
    """Box and mask prompts from per-object, per-slice masks.

    masks: (N, D, H, W), 0/1 or bool. Boxes come from their extent (jittered by `jitter` of the box side in
    the patch grid, for training), mask prompts from the masks themselves unless `mask_logits`
    (N, D, S/4, S/4) are given (the second pass gives the first pass's logits). `layout`: where the masks are
    present, known on the host (`HostLayout`), if it is.
    """
    boxes, present = boxes_from_masks(masks)
    if jitter > 0:
        boxes = jitter_boxes(boxes, present, jitter, masks.shape[-2:], generator)
    if mask_logits is None:
        mask_logits = masks_to_prompt_logits(masks, image_size // MASK_PROMPT_STRIDE)
    return ObjectPrompts(present=present, boxes=boxes_to_square_frame(boxes, masks.shape[-2:], image_size),
                         mask_logits=mask_logits, layout=layout)


def drop_training_prompts(prompts: ObjectPrompts, fraction: float,
                          generator: torch.Generator | None = None) -> ObjectPrompts:
    """Sparser training prompts, closer to what a person gives: each slice after the first is left without
    prompts with probability `fraction` (SAM 2 segments it from memory), and each other slice loses its mask
    prompt with probability `fraction` (a box alone).

    The first slice always keeps its prompts: it starts the memory. A slice is only left without prompts where
    no object appears that is absent from the slice before it: SAM 2 tracks objects, it does not discover them.
    """
    num_slices = prompts.present.shape[1]
    draws = torch.rand(2, num_slices, generator=generator, device="cpu").tolist()  # drawn on the host
    appears = (prompts.present[:, 1:] & ~prompts.present[:, :-1]).any(dim=0).tolist()
    unprompted = frozenset(d for d in range(1, num_slices) if draws[0][d] < fraction and not appears[d - 1])
    unmasked = frozenset(d for d in range(num_slices) if d not in unprompted and draws[1][d] < fraction)
    return dataclasses.replace(prompts, unprompted=unprompted, unmasked=unmasked)
