"""The SAM 2 settings of the `3d_rfmedsam2` configuration.

The planner writes them into the plans (``architecture.arch_kwargs``); the network reads them from
there. This module is the single place that knows their names, defaults and allowed values.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# plans identifiers and configuration names users and documentation rely on
PLANS_IDENTIFIER = "nnUNetRFMedSAM2Plans"
STAGE1_CONFIGURATION = "3d_fullres"
STAGE2_CONFIGURATION = "3d_rfmedsam2"
STAGE1_TRAINER = "nnUNetTrainerRFPrompt"
STAGE2_TRAINER = "nnUNetTrainerRFMedSAM2"
NETWORK_CLASS = "nnunetv2_rfmedsam.model.network.RFMedSAM2Network"

# sam2 1.1.0's packaged SAM 2.1 configs and Meta's official checkpoint file names, per model size
SAM2_MODELS = {
    "tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "small": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "base_plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "large": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
}
# the official SAM 2.1 checkpoint file stage 2 starts from (and whose frozen weights its folds reference)
SAM2_CHECKPOINT_VARIABLE = "RFMEDSAM2_SAM2_CHECKPOINT"
OFFICIAL_CHECKPOINT_HINT = (
    "Download an official SAM 2.1 checkpoint (sam2.1_hiera_{tiny,small,base_plus,large}.pt) from the "
    "facebookresearch/sam2 repository (its README links the files; checkpoints/download_ckpts.sh fetches all four)"
)

# the image encoder downsamples by 16 and the memory-attention RoPE grid must match it, and Hiera's
# window sizes need a multiple of 32
IMAGE_SIZE_MULTIPLE = 32


class SettingsError(ValueError):
    """An invalid SAM 2 setting; the message names the option and the allowed values."""


@dataclass(frozen=True)
class SAM2Settings:
    model_size: str = "tiny"
    # 1024: the size SAM 2 was trained at (see planners/ for the reasoning and the cheaper unpadded sizes)
    image_size: int = 1024
    adapter_width: int = 32
    refinement_passes: int = 2
    slices_per_patch: int = 8
    # in training, SAM 2 tracks this many of the foreground classes per step, drawn at random each step (the same
    # for every patch of the batch); the others keep their stage-1 logits. None: every class. The planner lowers it
    # to fit the GPU memory target (planners/training_memory.py); prediction always tracks every class
    objects_per_step: int | None = None
    use_memory: bool = True
    # fraction of the box side by which each box edge is randomly moved during training
    box_jitter: float = 0.1
    # in training, the second pass also gets a click at the first pass's errors (needs refinement_passes 2)
    train_with_clicks: bool = True
    # in training, the first pass leaves this fraction of a patch's slices after the first without prompts, to be
    # segmented from memory alone (as an interactive session's unprompted slices are), and gives this fraction
    # of the others a box without its mask (as a person's box is); 0 prompts every slice with box and mask
    training_prompt_dropout: float = 0.25
    # the refinement starts at its prompt: the output is a learned per-class gate between the stage-1 mask and SAM 2's
    # logits, starting at the stage-1 mask (false: the paper's plain refiner, SAM 2's logits alone)
    start_at_prompt: bool = True
    # weight of the presence loss (BCE of SAM 2's object score against the target's presence per slice) beside
    # nnU-Net's Dice + CE; 0 leaves the object-score head frozen
    presence_loss_weight: float = 1.0
    # per image channel, the window (low, high) of nnU-Net's normalised intensities mapped to SAM 2's [0, 1] pixel
    # range; None: the planner's defaults (see model/frames.py)
    intensity_windows: list | None = None
    # nnU-Net's test-time mirroring for stage 2: average over a flip of the last in-plane axis. Off by default: the
    # flip doubles stage 2's prediction time (SAM 2 re-runs every slice on the flipped image), and stage 2's
    # prompts already are stage 1's mirror ensemble
    test_time_mirroring: bool = False

    def __post_init__(self):
        validate_model_size(self.model_size)
        if not isinstance(self.start_at_prompt, bool):
            raise SettingsError(f"start_at_prompt: {self.start_at_prompt!r} is not allowed; use true or false")
        if not (isinstance(self.presence_loss_weight, (int, float)) and self.presence_loss_weight >= 0):
            raise SettingsError(f"presence_loss_weight: {self.presence_loss_weight!r} is not allowed; use a number >= 0")
        if self.intensity_windows is not None:
            windows = self.intensity_windows
            if not (isinstance(windows, (list, tuple)) and windows and all(
                    isinstance(w, (list, tuple)) and len(w) == 2 and float(w[0]) < float(w[1]) for w in windows)):
                raise SettingsError(f"intensity_windows: {windows!r} is not allowed; use one [low, high] per image "
                                    f"channel with low < high")
        validate_image_size(self.image_size)
        if not isinstance(self.adapter_width, int) or self.adapter_width < 1:
            raise SettingsError(f"adapter_width: {self.adapter_width!r} is not allowed; use a positive integer")
        if self.refinement_passes not in (1, 2):
            raise SettingsError(f"refinement_passes: {self.refinement_passes!r} is not allowed; allowed: 1, 2")
        if not isinstance(self.slices_per_patch, int) or self.slices_per_patch < 1:
            raise SettingsError(
                f"slices_per_patch: {self.slices_per_patch!r} is not allowed; use a positive integer")
        if self.objects_per_step is not None and (not isinstance(self.objects_per_step, int) or
                                                  isinstance(self.objects_per_step, bool) or
                                                  self.objects_per_step < 1):
            raise SettingsError(f"objects_per_step: {self.objects_per_step!r} is not allowed; use a positive integer "
                                f"or null (every class)")
        if not 0 <= self.box_jitter < 1:
            raise SettingsError(f"box_jitter: {self.box_jitter!r} is not allowed; use a fraction in [0, 1)")
        if not isinstance(self.test_time_mirroring, bool):
            raise SettingsError(f"test_time_mirroring: {self.test_time_mirroring!r} is not allowed; use true or false")
        if not isinstance(self.train_with_clicks, bool):
            raise SettingsError(f"train_with_clicks: {self.train_with_clicks!r} is not allowed; use true or false")
        if not 0 <= self.training_prompt_dropout < 1:
            raise SettingsError(f"training_prompt_dropout: {self.training_prompt_dropout!r} is not allowed; use a "
                                f"fraction in [0, 1)")

    @property
    def sam2_config(self) -> str:
        return SAM2_MODELS[self.model_size][0]

    @property
    def official_checkpoint_name(self) -> str:
        return SAM2_MODELS[self.model_size][1]

    def to_plans(self) -> dict:
        return asdict(self)

    @classmethod
    def from_plans(cls, arch_kwargs: dict) -> "SAM2Settings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in arch_kwargs.items() if k in names})


def validate_model_size(value: str, option: str = "model_size") -> str:
    if value not in SAM2_MODELS:
        raise SettingsError(f"{option}: {value!r} is not a SAM 2 model; allowed: {', '.join(SAM2_MODELS)}")
    return value


def validate_image_size(value: int, option: str = "image_size") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % IMAGE_SIZE_MULTIPLE:
        raise SettingsError(
            f"{option}: {value!r} is not allowed; use a positive multiple of {IMAGE_SIZE_MULTIPLE} "
            f"(for example 128, 256, 512, 1024)")
    return value
