"""Checkpoints replace their files atomically."""
from nnunetv2_rfmedsam.atomic_files import replacing


class AtomicCheckpointMixin:
    """Put before an nnUNetTrainer in the bases. nnU-Net's save_checkpoint writes straight into
    checkpoint_*.pth: a run killed while it writes (seconds, for a large network) leaves a truncated file, which
    `--c` then fails to load, and the previous checkpoint is lost with it."""

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)  # writes nothing (or only logs)
        with replacing(filename) as temporary:
            super().save_checkpoint(str(temporary))
