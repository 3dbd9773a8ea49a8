"""RFMedSAM2Network: the stage-2 network nnU-Net builds from the plans.

Input (B, C_img + K, D, H, W): the image channels, then the K one-hot stage-1 masks; D is the slice axis.
Output: logits (B, K + 1, D, H, W): a constant 0 background logit, then SAM 2's mask logit per class
(ABSENT_LOGIT on slices where the class has no prompt). In training, one such tensor per refinement pass.

Point prompts in training (`train_with_clicks`): the trainer hands the network the training target before a
forward (`set_click_targets`); the second pass then also gets one click per object and slice at the first
pass's errors (see error_clicks.py), so the refiner learns to take corrective clicks. Only a forward in training
mode reads the target, and each forward consumes it. The first pass's prompts are also made sparser in training
(`training_prompt_dropout`): some slices are left to memory alone, some get a box without a mask.

Image channels -> SAM 2's RGB input: one channel is repeated three times; two channels give (c0, c1, their
mean); more than three, the first three. No further normalisation: SAM 2 expects ImageNet-normalised RGB,
i.e. about zero mean and unit variance per channel, and nnU-Net's z-scored (or CT-normalised) intensities are
already on that scale.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_rfmedsam.model.adapters import freeze_for_finetuning, inject_adapters
from nnunetv2_rfmedsam.model.error_clicks import add_error_clicks
from nnunetv2_rfmedsam.model.prompts import drop_training_prompts, prompts_from_masks
from nnunetv2_rfmedsam.model.refinement import SliceLogits, encode_slices, refine_slices
from nnunetv2_rfmedsam.model.sam2_checkpoint import load_sam2_checkpoint
from nnunetv2_rfmedsam.model.sam2_model import build_sam2_model
from nnunetv2_rfmedsam.settings import SAM2Settings

BACKGROUND_LOGIT = 0.0


def slices_to_sam_frames(image: torch.Tensor, size: int) -> torch.Tensor:
    """Image channels (B, C, D, H, W) -> SAM 2 frames (B * D, 3, size, size), patch-major."""
    batch, channels, depth, height, width = image.shape
    slices = image.transpose(1, 2).reshape(batch * depth, channels, height, width).float()
    if channels == 1:
        rgb = slices.expand(-1, 3, -1, -1)
    elif channels == 2:
        rgb = torch.cat([slices, slices.mean(dim=1, keepdim=True)], dim=1)
    else:
        rgb = slices[:, :3]
    return F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class RFMedSAM2Network(nn.Module):
    """SAM 2 with adapters, refining the stage-1 masks in `refinement_passes` passes over a patch's slices.

    Built by nnU-Net's `get_network_from_plans` with the plans' SAM2Settings as keyword arguments. SAM 2's
    own weights are frozen here; call `load_sam2_checkpoint` to give it the official ones.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **settings):
        super().__init__()
        # SAM 2 has one output resolution; nnU-Net passes the flag for its own UNets
        del deep_supervision
        self.settings = SAM2Settings(**settings)
        self.num_foreground_classes = num_classes - 1
        self.image_channels = input_channels - self.num_foreground_classes
        if self.num_foreground_classes < 1 or self.image_channels < 1:
            raise ValueError(f"RFMedSAM2Network needs at least one image channel and one foreground class; got "
                             f"input_channels={input_channels} (image channels + one mask per foreground class) "
                             f"and num_classes={num_classes} (background + foreground classes)")
        self.sam = build_sam2_model(self.settings.model_size, self.settings.image_size)
        inject_adapters(self.sam, self.settings.adapter_width)
        freeze_for_finetuning(self.sam)
        self._click_targets: torch.Tensor | None = None

    def set_click_targets(self, target: torch.Tensor) -> None:
        """The training target (B, 1, D, H, W) of the next forward, a label map whose label k + 1 is the k-th
        foreground class (nnU-Net's consecutive labels): pass 2's clicks are sampled from pass 1's errors."""
        self._click_targets = target

    def load_sam2_checkpoint(self, path) -> None:
        """Load an official SAM 2.1 checkpoint of the planned model size (adapters keep their values)."""
        load_sam2_checkpoint(self.sam, path, self.settings.model_size)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, return_all_passes: bool | None = None):
        """Logits of the final pass, or (by default in training) a list with the logits of every pass.

        On CUDA, SAM 2 runs under bfloat16 autocast (whatever autocast nnU-Net opened around it); the logits
        are float32 either way."""
        if return_all_passes is None:
            return_all_passes = self.training
        precision = torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else contextlib.nullcontext()
        with precision:
            passes = self._refine(x)
        return passes if return_all_passes else passes[-1]

    def _object_click_targets(self, x: torch.Tensor) -> torch.Tensor | None:
        """The target given by `set_click_targets`, per object (B * K, D, H, W) bool, if this forward samples
        clicks; None otherwise. The target is consumed either way."""
        target, self._click_targets = self._click_targets, None
        if target is None or not (self.training and self.settings.train_with_clicks):
            return None
        labels = target[:, 0].to(x.device)
        per_class = torch.stack([labels == k + 1 for k in range(self.num_foreground_classes)], dim=1)
        return per_class.reshape(-1, *per_class.shape[2:])

    def _refine(self, x: torch.Tensor) -> list[torch.Tensor]:
        batch, _, depth, height, width = x.shape
        size = self.settings.image_size
        click_targets = self._object_click_targets(x)
        features = encode_slices(self.sam, slices_to_sam_frames(x[:, :self.image_channels], size), depth)
        # one object per (batch item, class): (B, K, D, H, W) -> (N, D, H, W)
        stage1 = x[:, self.image_channels:].reshape(-1, depth, height, width)
        prompts = prompts_from_masks(stage1, size, jitter=self.settings.box_jitter if self.training else 0.0)
        if self.training and self.settings.use_memory and self.settings.training_prompt_dropout > 0:
            prompts = drop_training_prompts(prompts, self.settings.training_prompt_dropout)
        outputs = []
        for refinement_pass in range(self.settings.refinement_passes):
            result = refine_slices(self.sam, features, prompts, self.settings.use_memory, (height, width))
            outputs.append(self._class_logits(result, batch))
            if refinement_pass + 1 < self.settings.refinement_passes:
                # the next pass is prompted by this pass's result, as a prompt: no gradient through it
                predicted = result.patch.detach() > 0
                prompts = prompts_from_masks(predicted, size, mask_logits=result.low_res.detach())
                if click_targets is not None:
                    prompts = add_error_clicks(prompts, predicted, click_targets, size)
        return outputs

    def _class_logits(self, result: SliceLogits, batch: int) -> torch.Tensor:
        per_class = result.patch.float().reshape(batch, self.num_foreground_classes, *result.patch.shape[1:])
        background = torch.full_like(per_class[:, :1], BACKGROUND_LOGIT)
        return torch.cat([background, per_class], dim=1)
