from torch.optim.lr_scheduler import _LRScheduler


class WarmupPolyLRScheduler(_LRScheduler):
    """Linear warmup over `warmup_steps`, then nnU-Net's poly decay; stepped per epoch like PolyLRScheduler.

    The adapters start as the identity and the mask-decoder heads are pretrained: a warmup keeps the first
    AdamW steps, whose second-moment estimates are still poor, from knocking them off that starting point.
    """

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int, exponent: float = 0.9):
        self.initial_lr = initial_lr
        self.max_steps = max_steps
        self.warmup_steps = min(warmup_steps, max_steps)
        self.exponent = exponent
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return self.initial_lr * max(0.0, 1 - progress) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
