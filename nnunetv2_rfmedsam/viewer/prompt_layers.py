"""The prompt layers' data as the session's prompts.

napari places what a person clicks or draws at a world position, translate + index * scale, and a layer stores
it in its own data coordinates (`world_to_data`). The clicks and boxes layers are made with the image layer's
scale and translate (`image_geometry`), so their data are the image's voxel indices (slice, y, x): the
coordinates the session takes, whatever the image's spacing and origin.
"""
from __future__ import annotations

import numpy as np

from nnunetv2_rfmedsam.interactive.corrections import Box, Click


def image_geometry(image_layer) -> dict:
    """The scale and translate that a layer needs for its data to be `image_layer`'s voxel indices."""
    return {"scale": image_layer.scale, "translate": image_layer.translate}


def clicks_from_points(points, positive: bool) -> list[Click]:
    """A Points layer's data (N, 3) -> clicks on the slices they were placed on."""
    return [Click(int(round(z)), float(y), float(x), positive) for z, y, x in np.asarray(points).reshape(-1, 3)]


def boxes_from_rectangles(rectangles) -> list[Box]:
    """A Shapes layer's rectangles (each (4, 3) corners, drawn in any direction) -> boxes (y0 <= y1, x0 <= x1)."""
    boxes = []
    for corners in rectangles:
        corners = np.asarray(corners)
        (y0, x0), (y1, x1) = corners[:, 1:].min(axis=0), corners[:, 1:].max(axis=0)
        boxes.append(Box(int(round(corners[0, 0])), float(y0), float(x0), float(y1), float(x1)))
    return boxes
