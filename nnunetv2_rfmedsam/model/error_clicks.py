"""Corrective clicks sampled from a prediction's errors, to train the refiner on point prompts.

SAM 2 is trained interactively (sam2's `training/model/sam2.py`): after a first prediction of a frame, a click
is sampled uniformly from its error region, positive in a false negative, negative in a false positive, and
the frame is predicted again with it. The refiner's second pass does the same per object and slice: pass 1's
result gives the box and mask prompts (`prompts_from_masks`), and pass 1's errors against the training target
give one click, drawn by sam2's own `sample_random_points_from_errors`. A slice without errors gets no click.
A positive click on a slice where pass 1 found nothing makes the object present there, without a box: the
case of a user clicking on a slice the segmentation missed.
"""
from __future__ import annotations

import dataclasses

import torch
from sam2.modeling.sam2_utils import sample_random_points_from_errors

from nnunetv2_rfmedsam.model.prompts import NOT_A_POINT, POSITIVE_CLICK, ObjectPrompts, points_to_square_frame


def sample_error_clicks(predicted: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per object and slice at a uniformly drawn error pixel.

    predicted, target: (N, D, H, W) bool. Returns clicks (N, D, 1, 2) as (x, y) pixel indices of the (H, W)
    grid and labels (N, D, 1): POSITIVE_CLICK in a false negative, NEGATIVE_CLICK in a false positive,
    NOT_A_POINT where the slice has no error (sam2 would put a negative click on the background there).
    """
    lead = predicted.shape[:2]
    flat_target = target.reshape(-1, 1, *target.shape[-2:])
    flat_predicted = predicted.reshape(flat_target.shape)
    points, labels = sample_random_points_from_errors(flat_target, flat_predicted, num_pt=1)
    has_error = (flat_target != flat_predicted).flatten(1).any(dim=1, keepdim=True)
    labels = torch.where(has_error, labels, NOT_A_POINT)
    return points.reshape(*lead, 1, 2), labels.reshape(*lead, 1)


def add_error_clicks(prompts: ObjectPrompts, predicted: torch.Tensor, target: torch.Tensor,
                     image_size: int) -> ObjectPrompts:
    """`prompts` (boxes and masks, no clicks yet) plus one click per object and slice at an error of
    `predicted` against `target` (both (N, D, H, W) bool), scaled to SAM 2's image_size x image_size frame."""
    clicks, labels = sample_error_clicks(predicted, target)
    positive = (labels == POSITIVE_CLICK).any(dim=-1)
    return dataclasses.replace(prompts, present=prompts.present | positive, boxed=prompts.present,
                               clicks=points_to_square_frame(clicks, predicted.shape[-2:], image_size),
                               click_labels=labels, layout=None)  # where clicks land is known on the device
