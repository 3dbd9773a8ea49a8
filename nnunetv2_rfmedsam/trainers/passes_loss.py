import torch
import torch.nn.functional as F
from torch import nn


def presence_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Whether each foreground class is on each slice: target (B, 1, D, H, W) label map -> (B, K, D) floats."""
    labels = target[:, 0]
    return torch.stack([(labels == k + 1).flatten(2).any(dim=2) for k in range(num_classes)], dim=1).float()


class RefinementPassesLoss(nn.Module):
    """nnU-Net's loss on every refinement pass, plus the presence loss on SAM 2's object scores.

    In training the network returns a TrainingOutput: every pass is supervised, and each pass's object-score
    logits (B, K, D) get a binary cross-entropy against the target's presence per class and slice, as Meta trains
    SAM 2's object-score head, weighted by `presence_weight`. In validation the network returns the final pass
    alone, and only nnU-Net's loss applies."""

    def __init__(self, loss: nn.Module, presence_weight: float = 0.0):
        super().__init__()
        self.loss = loss
        self.presence_weight = presence_weight

    def forward(self, output, target):
        if not hasattr(output, "passes"):
            return self.loss(output, target)
        total = 0.0
        for logits, scores in zip(output.passes, output.object_scores):
            total = total + self.loss(logits, target)
            if self.presence_weight > 0:
                present = presence_targets(target, scores.shape[1]).to(scores.device)
                total = total + self.presence_weight * F.binary_cross_entropy_with_logits(scores.float(), present)
        return total / len(output.passes)
