from torch import nn


class RefinementPassesLoss(nn.Module):
    """nnU-Net's loss applied to every refinement pass: in training the network returns one output per
    pass, so both passes are supervised; in validation it returns the final pass alone."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, output, target):
        if isinstance(output, (list, tuple)):
            return sum(self.loss(o, target) for o in output) / len(output)
        return self.loss(output, target)
