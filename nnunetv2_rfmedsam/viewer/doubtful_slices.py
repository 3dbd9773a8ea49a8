"""Where a person should look first: the slices on which the automatic pass is least sure of a class.

Two per-slice signals, both from the automatic pass itself (no ground truth):
- agreement: the Dice, on the slice, between stage 1's mask of the class and the cascade's. Where SAM 2 moved
  far from its prompt, one of the two is wrong;
- certainty: stage 1's mean |2p - 1| over the slice's voxels that either stage gives the class, with p stage 1's
  probability of the class: 1 where the prompt UNet is sure, 0 where it hesitates at p = 0.5.
A slice is doubtful when either falls below its threshold; the list is ordered from the most doubtful.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AGREEMENT_THRESHOLD = 0.8
CERTAINTY_THRESHOLD = 0.6


@dataclass(frozen=True)
class DoubtfulSlice:
    class_id: int
    slice_index: int
    agreement: float   # Dice of stage 1 and the cascade on the slice
    certainty: float   # stage 1's mean |2p - 1| over the slice's voxels of the class

    @property
    def doubt(self) -> float:
        """How far below its threshold the worse signal is (0 at the threshold, 1 at the worst)."""
        return max(1 - self.agreement / AGREEMENT_THRESHOLD, 1 - self.certainty / CERTAINTY_THRESHOLD)

    def describe(self, class_name: str) -> str:
        return (f"slice {self.slice_index}: {class_name}, stage 1 vs cascade Dice {self.agreement:.2f}, "
                f"stage-1 certainty {self.certainty:.2f}")


def doubtful_slices(stage1: np.ndarray, cascade: np.ndarray, stage1_probabilities: np.ndarray,
                    channel_of_label: dict[int, int], limit: int = 50) -> list[DoubtfulSlice]:
    """stage1, cascade: label maps (D, H, W); stage1_probabilities: (K + 1, D, H, W) on the same grid, channels
    as `channel_of_label` says. The doubtful slices of every foreground class, most doubtful first."""
    if stage1.shape != cascade.shape or stage1_probabilities.shape[1:] != stage1.shape:
        raise ValueError(f"stage 1 {stage1.shape}, cascade {cascade.shape} and stage-1 probabilities "
                         f"{stage1_probabilities.shape[1:]} must share one grid")
    found = []
    for class_id, channel in channel_of_label.items():
        if class_id == 0:
            continue
        first, second = stage1 == class_id, cascade == class_id
        union = first | second
        for d in np.flatnonzero(union.any(axis=(1, 2))):
            both = np.count_nonzero(first[d] & second[d])
            agreement = 2 * both / (np.count_nonzero(first[d]) + np.count_nonzero(second[d]))
            certainty = float(np.abs(2 * stage1_probabilities[channel, d][union[d]] - 1).mean())
            candidate = DoubtfulSlice(class_id, int(d), float(agreement), certainty)
            if candidate.doubt > 0:
                found.append(candidate)
    found.sort(key=lambda s: (-s.doubt, s.class_id, s.slice_index))
    return found[:limit]
