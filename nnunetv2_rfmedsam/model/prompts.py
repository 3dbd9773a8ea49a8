"""Prompts derived from masks: per-class, per-slice boxes and mask prompts in SAM 2's frame.

SAM 2 sees each slice resized to S x S without preserving the aspect ratio (as its video predictor loads
frames), so prompts are scaled per axis from the patch grid (H, W) to S x S. Coordinates are pixel indices
(x, y), with pixel centres mapped to pixel centres as the bilinear frame resize does.

Plain torch, no SAM 2: the label values below are SAM's prompt-encoder conventions.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    (its extent in pixels along that axis), then clip to the image. Absent boxes are returned unchanged."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    sides = torch.stack([x1 - x0 + 1, y1 - y0 + 1] * 2, dim=-1)
    shifts = (2 * torch.rand(boxes.shape, generator=generator, device=boxes.device) - 1) * fraction * sides
    jx0, jy0, jx1, jy1 = (boxes + shifts).unbind(-1)
    height, width = image_hw
    # large fractions can swap two edges: keep the box's corners ordered
    jittered = torch.stack([torch.minimum(jx0, jx1).clamp(0, width - 1), torch.minimum(jy0, jy1).clamp(0, height - 1),
                            torch.maximum(jx0, jx1).clamp(0, width - 1), torch.maximum(jy0, jy1).clamp(0, height - 1)],
                           dim=-1)
    return torch.where(present.unsqueeze(-1), jittered, boxes)


def boxes_to_square_frame(boxes: torch.Tensor, image_hw: tuple[int, int], size: int) -> torch.Tensor:
    """Boxes (..., 4) in pixel indices of an (H, W) grid -> pixel indices of that grid resized to size x size."""
    height, width = image_hw
    scale = boxes.new_tensor([size / width, size / height] * 2)
    return (boxes + 0.5) * scale - 0.5


def masks_to_prompt_logits(masks: torch.Tensor, size: int) -> torch.Tensor:
    """0/1 masks (..., H, W) -> mask-prompt logits (..., size, size) of +-MASK_PROMPT_LOGIT (fractions in
    between at resampled edges)."""
    lead = masks.shape[:-2]
    resized = F.interpolate(masks.reshape(-1, 1, *masks.shape[-2:]).float(), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=True)
    return ((2 * resized - 1) * MASK_PROMPT_LOGIT).reshape(*lead, size, size)


@dataclass
class ObjectPrompts:
    """The prompts of N objects (one per batch item and class) on each of D slices, in SAM 2's S x S frame.

    present:      (N, D) bool; where False the object is absent from the slice: it gets no prompt and its
                  output there is background (see refinement.py)
    boxes:        (N, D, 4) x0, y0, x1, y1, used where present
    mask_logits:  (N, D, S/4, S/4) mask prompts as logits, or None for no mask prompt
    clicks:       (N, D, P, 2) extra points (x, y), or None; `click_labels` (N, D, P) holds POSITIVE_CLICK,
                  NEGATIVE_CLICK or NOT_A_POINT (padding) for each
    """

    present: torch.Tensor
    boxes: torch.Tensor
    mask_logits: torch.Tensor | None = None
    clicks: torch.Tensor | None = None
    click_labels: torch.Tensor | None = None

    def point_inputs(self, slice_index: int) -> dict:
        """SAM 2's `point_inputs` on one slice: the box corners (NOT_A_POINT where absent), then the clicks.

        The box slot is always there, so SAM 2 always sees at least two points and gives its single-mask
        output (SAM 2.1 gives three candidate masks for zero or one point)."""
        present = self.present[:, slice_index, None]
        coords = self.boxes[:, slice_index].reshape(-1, 2, 2)
        labels = torch.where(present, torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], device=present.device),
                             NOT_A_POINT)
        if self.clicks is not None:
            coords = torch.cat([coords, self.clicks[:, slice_index]], dim=1)
            labels = torch.cat([labels, self.click_labels[:, slice_index]], dim=1)
        return {"point_coords": coords.float(), "point_labels": labels.to(torch.int32)}

    def mask_inputs(self, slice_index: int) -> torch.Tensor | None:
        """SAM 2's `mask_inputs` on one slice: (N, 1, S/4, S/4) logits, or None."""
        return None if self.mask_logits is None else self.mask_logits[:, slice_index, None]


def prompts_from_masks(masks: torch.Tensor, image_size: int, mask_logits: torch.Tensor | None = None,
                       jitter: float = 0.0, generator: torch.Generator | None = None) -> ObjectPrompts:
    """Box and mask prompts from per-object, per-slice masks.

    masks: (N, D, H, W), 0/1 or bool. Boxes come from their extent (jittered by `jitter` of the box side in
    the patch grid, for training), mask prompts from the masks themselves unless `mask_logits`
    (N, D, S/4, S/4) are given (the second pass gives the first pass's logits).
    """
    boxes, present = boxes_from_masks(masks)
    if jitter > 0:
        boxes = jitter_boxes(boxes, present, jitter, masks.shape[-2:], generator)
    if mask_logits is None:
        mask_logits = masks_to_prompt_logits(masks, image_size // MASK_PROMPT_STRIDE)
    return ObjectPrompts(present=present, boxes=boxes_to_square_frame(boxes, masks.shape[-2:], image_size),
                         mask_logits=mask_logits)
