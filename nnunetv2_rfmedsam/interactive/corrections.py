"""A person's corrections of the automatic label map, one class at a time, through the interactive session.

Refining a class:
- the first time, the session is seeded with the class's current mask (its box and mask on every slice that has
  it, `InteractiveSession.add_mask`), so that corrections start from what the person sees; the session then
  computes the class as the cascade does, from that mask moved towards SAM 2 by the model's trained gate;
- each slice's new prompts are added to it: a box and/or clicks, with SAM 2's previous result on the slice as
  mask prompt (SAM 2's video predictor's correction);
- what changes: the slices the person prompted in this refinement take the session's result for the class. Every
  other slice keeps what it holds, the automatic result or earlier corrections, as SAM 2's video predictor keeps
  its conditioning frames, unless the person asks to propagate (`propagate=True`): then every slice takes the
  session's result, which SAM 2 carried through its memory from the prompted slices;
- prompts hold whatever the weights: a negative click's voxel loses the class, a positive click's voxel gets it
  (unless it belongs to another class and `overwrite` is off), and on a slice with boxes the class lies inside
  them. Negative clicks alone on a slice only remove the class there. So with a refiner whose gates are still
  closed, a click changes its own voxel and a box trims the class to itself;
- other classes keep their voxels: the class only takes background, unless `overwrite` lets it take other
  classes' voxels too.

Each refinement is one step of undo, session and label map together; reset returns to the automatic result.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnunetv2_rfmedsam.interactive.session import InteractiveSession


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
    class_id: int
    clicks: tuple           # the step's clicks and boxes, which hold whenever their slice changes again
    boxes: tuple


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
               label_map: np.ndarray | None = None, propagate: bool = False) -> np.ndarray:
        """Add the clicks and boxes to the class and return the new label map, changed on the prompted slices
        (every slice with `propagate`). `label_map`: the map to correct (default the last result; the viewer passes
        its layer, which the person may have painted)."""
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
            prompted = _by_slice(clicks, boxes)
            for slice_index, slice_clicks, slice_boxes in prompted:
                points = [(c.y, c.x, int(c.positive)) for c in slice_clicks]
                for number, box in enumerate(slice_boxes or [None]):
                    self.session.add_prompt(class_id, slice_index,
                                            box=None if box is None else (box.y0, box.x0, box.y1, box.x1),
                                            points=points if number == 0 else None)
                    actions += 1
            mask = self.session.class_mask(class_id)
        except Exception:
            for _ in range(actions):  # nothing half-applied stays in the session
                self.session.undo()
            raise
        if seeded is not None:
            self._seeded.add(seeded)
        reached = list(range(len(base))) if propagate else [d for d, _, _ in prompted]
        result = _take_class(base, mask, class_id, reached, overwrite)
        for d, slice_clicks, slice_boxes in prompted:
            if not slice_boxes and not any(c.positive for c in slice_clicks):
                added = (result[d] == class_id) & (base[d] != class_id)
                result[d][added] = base[d][added]  # negative clicks alone only remove
        earlier = [step for step in self._steps if step.class_id == class_id]
        for click in [c for step in earlier for c in step.clicks] + list(clicks):
            if click.slice_index in reached:
                _hold_click(result, click, class_id, overwrite)
        all_boxes = [b for step in earlier for b in step.boxes] + list(boxes)
        for d in reached:
            _keep_inside_boxes(result, d, [box for box in all_boxes if box.slice_index == d], class_id)
        self._steps.append(_Step(base.copy(), actions, seeded, class_id, tuple(clicks), tuple(boxes)))
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


def _take_class(base: np.ndarray, mask: np.ndarray, class_id: int, reached: list[int], overwrite: bool) -> np.ndarray:
    """`base` with the class replaced by `mask` on the slices `reached`, over background (or any class)."""
    result = base.copy()
    changed = result[reached]
    changed[changed == class_id] = 0
    changed[mask[reached] if overwrite else mask[reached] & (changed == 0)] = class_id
    result[reached] = changed
    return result


def _hold_click(label_map: np.ndarray, click: Click, class_id: int, overwrite: bool) -> None:
    """A negative click's voxel loses the class; a positive click's voxel gets it (from background only, unless
    `overwrite`)."""
    height, width = label_map.shape[1:]
    voxel = (click.slice_index, int(np.clip(round(click.y), 0, height - 1)), int(np.clip(round(click.x), 0, width - 1)))
    if not click.positive and label_map[voxel] == class_id:
        label_map[voxel] = 0
    elif click.positive and (overwrite or label_map[voxel] == 0):
        label_map[voxel] = class_id


def _keep_inside_boxes(label_map: np.ndarray, d: int, boxes: list[Box], class_id: int) -> None:
    """The class on slice `d` keeps only its voxels inside one of the slice's boxes (none: all of them)."""
    if not boxes:
        return
    inside = np.zeros(label_map.shape[1:], dtype=bool)
    for box in boxes:
        inside[int(np.floor(min(box.y0, box.y1))):int(np.ceil(max(box.y0, box.y1))) + 1,
               int(np.floor(min(box.x0, box.x1))):int(np.ceil(max(box.x0, box.x1))) + 1] = True
    label_map[d][(label_map[d] == class_id) & ~inside] = 0


def _by_slice(clicks, boxes):
    """(slice, its clicks, its boxes), by slice."""
    slices = sorted({c.slice_index for c in clicks} | {b.slice_index for b in boxes})
    return [(d, [c for c in clicks if c.slice_index == d], [b for b in boxes if b.slice_index == d]) for d in slices]
