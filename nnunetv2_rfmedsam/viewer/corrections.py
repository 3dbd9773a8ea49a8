"""A person's corrections of the automatic label map, one class at a time, through the interactive session.

Refining a class:
- the first time, the session is seeded with the class's current mask (its box and mask on every slice that has
  it, `InteractiveSession.add_mask`), so that corrections start from what the person sees;
- each slice's new prompts are added to it: a box and/or clicks; clicks keep the seed and SAM 2's previous result
  on the slice as mask prompt (SAM 2's video predictor's correction). Negative clicks alone on a slice drop the
  slice's seed (`replace`): the class is then removed from that slice, whatever the weights;
- SAM 2 propagates the class through the volume from the cached features, and the class's voxels of the label
  map become the session's result for it. Other classes keep their voxels: the class only takes background,
  unless `overwrite` lets it take other classes' voxels too.

Each refinement is one step of undo, session and label map together; reset returns to the automatic result.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnunetv2_rfmedsam.interactive import InteractiveSession


@dataclass(frozen=True)
class Click:
    slice_index: int
    y: float
    x: float
    positive: bool


@dataclass(frozen=True)
class Box:
    slice_index: int
    y0: float
    x0: float
    y1: float
    x1: float


@dataclass(frozen=True)
class _Step:
    label_map: np.ndarray   # before the step
    session_actions: int    # prompt actions the step added to the session
    seeded: int | None      # the class the step seeded, if it did


class Corrections:
    def __init__(self, session: InteractiveSession, automatic: np.ndarray):
        if automatic.shape != session.image.original_shape:
            raise ValueError(f"automatic label map {automatic.shape} is not on the image's grid "
                             f"{session.image.original_shape}")
        self.session = session
        self.automatic = automatic.copy()
        self.label_map = automatic.copy()
        self._seeded: set[int] = set()
        self._steps: list[_Step] = []

    @property
    def can_undo(self) -> bool:
        return bool(self._steps)

    def refine(self, class_id: int, clicks=(), boxes=(), overwrite: bool = False,
               label_map: np.ndarray | None = None) -> np.ndarray:
        """Add the clicks and boxes to the class, propagate, and return the new label map. `label_map`: the map
        to correct (default the last result; the viewer passes its layer, which the person may have painted)."""
        if not clicks and not boxes:
            raise ValueError("add a click or a box first")
        base = self.label_map if label_map is None else np.asarray(label_map)
        if base.shape != self.label_map.shape:
            raise ValueError(f"label map {base.shape} is not on the image's grid {self.label_map.shape}")
        actions, seeded = 0, None
        try:
            if class_id not in self._seeded and (base == class_id).any():
                self.session.add_mask(class_id, base == class_id)
                actions, seeded = 1, class_id
            for slice_index, slice_clicks, slice_boxes in _by_slice(clicks, boxes):
                points = [(c.y, c.x, int(c.positive)) for c in slice_clicks]
                negative_only = not slice_boxes and not any(c.positive for c in slice_clicks)
                for number, box in enumerate(slice_boxes or [None]):
                    self.session.add_prompt(class_id, slice_index,
                                            box=None if box is None else (box.y0, box.x0, box.y1, box.x1),
                                            points=points if number == 0 else None, replace=negative_only)
                    actions += 1
            mask = self.session.class_mask(class_id)
        except Exception:
            for _ in range(actions):  # nothing half-applied stays in the session
                self.session.undo()
            raise
        if seeded is not None:
            self._seeded.add(seeded)
        result = base.copy()
        result[result == class_id] = 0
        result[mask if overwrite else mask & (result == 0)] = class_id
        self._steps.append(_Step(base.copy(), actions, seeded))
        self.label_map = result
        return result

    def undo(self) -> np.ndarray:
        """Undo the last refinement; returns the label map from before it."""
        if not self._steps:
            raise ValueError("nothing to undo")
        step = self._steps.pop()
        for _ in range(step.session_actions):
            self.session.undo()
        self._seeded.discard(step.seeded)
        self.label_map = step.label_map
        return self.label_map

    def reset(self) -> np.ndarray:
        """Back to the automatic result; SAM 2's features of the image stay cached."""
        self.session.reset()
        self._seeded.clear()
        self._steps.clear()
        self.label_map = self.automatic.copy()
        return self.label_map


def _by_slice(clicks, boxes):
    """(slice, its clicks, its boxes), by slice."""
    slices = sorted({c.slice_index for c in clicks} | {b.slice_index for b in boxes})
    return [(d, [c for c in clicks if c.slice_index == d], [b for b in boxes if b.slice_index == d]) for d in slices]
