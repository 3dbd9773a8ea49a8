"""RFMedSAM2Network: the stage-2 network nnU-Net builds from the plans.

Input (B, C_img + K, D, H, W): the image channels, then the K one-hot stage-1 masks; D is the slice axis.
Output: logits (B, K + 1, D, H, W): a constant 0 background logit, then one logit per class. In training, a
`TrainingOutput` with the logits of every refinement pass and SAM 2's object scores (for the presence loss).

Starting at the prompt (`start_at_prompt`, on by default): a class's logit is the stage-1 mask's logit
(+-PROMPT_LOGIT) plus a learned per-class, per-pass gate times SAM 2's departure from it,
`prompt + gate * (sam - prompt)`. Each gate is the sigmoid of a trained logit, so it stays in (0, 1) whatever
training does: the result lies between stage 1's mask and SAM 2's logits, never beyond either. The gates start
at GATE_START, where an untrained refiner returns stage 1's segmentation voxel for voxel, whatever SAM 2's
weights are, and training learns how far to move from it (the trainer leaves the gate logits out of weight
decay, which would pull every gate towards 0.5). Off: the paper's plain refiner, SAM 2's logits alone.

Point prompts in training (`train_with_clicks`): the trainer hands the network the training target before a
forward (`set_click_targets`); the second pass then also gets one click per object and slice at the first
pass's errors (see error_clicks.py), so the refiner learns to take corrective clicks. Only a forward in training
mode reads the target, and each forward consumes it. The first pass's prompts are also made sparser in training
(`training_prompt_dropout`): some slices are left to memory alone, some get a box without a mask.

Where the refiner differs from SAM 2 is named in departures.py (`self.departures`); the image channels become
SAM 2 frames in frames.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from nnunetv2_rfmedsam.model.adapters import adapter_parameter_names, freeze_for_finetuning, inject_adapters
from nnunetv2_rfmedsam.model.compilation import compile_per_slice_step
from nnunetv2_rfmedsam.model.device_constants import device_constant
from nnunetv2_rfmedsam.model.error_clicks import add_error_clicks
from nnunetv2_rfmedsam.model.frames import ZSCORE_WINDOW, require_finite_intensities, slices_to_sam_frames
from nnunetv2_rfmedsam.model.precision import sam2_precision
from nnunetv2_rfmedsam.model.departures import REFINER
from nnunetv2_rfmedsam.model.prompts import (MASK_PROMPT_STRIDE, HostLayout, ObjectPrompts, drop_training_prompts,
                                             masks_to_prompt_logits, prompts_from_masks)
from nnunetv2_rfmedsam.model.refinement import (ABSENT_LOGIT, ABSENT_SCORE, SliceOutput, SliceWalk, encode_slices,
                                                logits_to_grid, object_index)
from nnunetv2_rfmedsam.model.sam2_checkpoint import load_sam2_checkpoint
from nnunetv2_rfmedsam.model.sam2_model import build_sam2_model
from nnunetv2_rfmedsam.model.sam2_reference import REFERENCE_KEY, SAM2Reference, locate
from nnunetv2_rfmedsam import cascade_export, cascade_inputs, whole_volume_prediction
from nnunetv2_rfmedsam.settings import SAM2Settings

BACKGROUND_LOGIT = 0.0
# the logit of a stage-1 mask where the refinement starts: foreground +10, background -10 against the constant
# background logit 0 (SAM 2's own scale for masks given as logits, `_use_mask_as_output`)
PROMPT_LOGIT = 10.0
# the prompt gates' start. A sigmoid never reaches 0, and far in its tail its gradient vanishes (Adam's epsilon
# then damps the step); at 1e-3 the gradient is a thousandth of the gate's, which Adam's normalisation turns into
# its usual step, and the start still is stage 1's label map: a foreground prompt's logit
# PROMPT_LOGIT + GATE_START * (sam - PROMPT_LOGIT) stays above the background's 0, and a background prompt's below
# it, for any SAM 2 logit |sam| < PROMPT_LOGIT / GATE_START - PROMPT_LOGIT (~1e4; SAM 2's NO_OBJ_SCORE is -1024)
GATE_START = 1e-3
# gates given by value (`gate_logits`: older checkpoints' gates, tests, tools) are clamped into this range, since
# 0 and 1 have no finite logit. Below: a gate under the start gives the start's label maps (see above) from deeper
# in the sigmoid's flat tail, where it would hardly train; above: at 1 - 1e-6 the output is SAM 2's logits to
# float32 precision, and its logit (13.8) still has a gradient.
GATE_RANGE = (GATE_START, 1.0 - 1e-6)
# the parameter holding the gates' logits (the trainer keeps it out of weight decay)
PROMPT_GATE_LOGITS = "prompt_gate_logits"
# the key under which checkpoints written before the sigmoid held the gates themselves
LEGACY_PROMPT_GATES = "prompt_gates"
# slices whose image features are computed together in prediction: a few for the encoder's batch efficiency
# on a GPU, never a volume's worth
SLICES_PER_ENCODER_CALL = 4


def gate_logits(gates) -> torch.Tensor:
    """Gate values -> the logits whose sigmoid they are, after clamping them into GATE_RANGE (a gate outside
    [0, 1], which unconstrained gates could learn, becomes its nearest bound)."""
    return torch.logit(torch.as_tensor(gates, dtype=torch.float32).clamp(*GATE_RANGE))


@dataclass
class TrainingOutput:
    """What a forward in training returns: per refinement pass, the logits (B, K + 1, D, H, W) and SAM 2's
    object-score logits (B, K, D)."""

    passes: list
    object_scores: list


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
        trains_memory_attention = self.settings.use_memory and self.settings.slices_per_patch > 1
        inject_adapters(self.sam, self.settings.adapter_width, memory_attention=trains_memory_attention)
        freeze_for_finetuning(self.sam, train_object_score=self.settings.presence_loss_weight > 0)
        if self.settings.start_at_prompt:
            start = torch.full((self.settings.refinement_passes, self.num_foreground_classes), GATE_START)
            self.prompt_gate_logits = nn.Parameter(gate_logits(start))
        else:
            self.register_parameter(PROMPT_GATE_LOGITS, None)
        self.departures = REFINER
        # plans written before the planner chose windows: nnU-Net's default normalisation is the z-score
        self.intensity_windows = self.settings.intensity_windows or [list(ZSCORE_WINDOW)] * self.image_channels
        if len(self.intensity_windows) != self.image_channels:
            raise ValueError(f"intensity_windows: {len(self.intensity_windows)} window(s) for {self.image_channels} "
                             f"image channel(s)")
        self._click_targets: torch.Tensor | None = None
        # the classes SAM 2 tracks in this training step, when `objects_per_step` leaves some out (None: all)
        self._tracked_classes: np.ndarray | None = None
        # set by load_sam2_checkpoint: the file SAM 2's frozen weights came from, and their state-dict keys
        self.sam2_reference: SAM2Reference | None = None
        self._referenced_keys: set[str] = set()
        # nnU-Net's predictor hands this network whole volumes (whole_volume_prediction.py); False: nnU-Net's
        # sliding windows, as for any network
        self.predicts_whole_volumes = True
        # called with 1 after each slice of a forward in prediction (whole_volume_prediction.py's progress bar)
        self.slice_progress = None
        # where a forward in prediction keeps its logits (None: the input's device); whole_volume_prediction.py
        # moves them to the CPU when the GPU runs out of memory
        self.results_device: torch.device | None = None
        # and in which dtype (None: float32); whole_volume_prediction.py asks for half precision, as nnU-Net's sliding
        # window keeps its result buffers
        self.results_dtype: torch.dtype | None = None
        whole_volume_prediction.install()
        cascade_inputs.install()
        cascade_export.install()

    @property
    def prompt_gates(self) -> torch.Tensor | None:
        """The gates (passes, K) in (0, 1), each the sigmoid of its logit; None for the plain refiner."""
        return None if self.prompt_gate_logits is None else torch.sigmoid(self.prompt_gate_logits)

    def set_prompt_gates(self, value) -> None:
        """Set the gates (a number, or one per pass and class) to `value`, clamped into GATE_RANGE."""
        with torch.no_grad():
            self.prompt_gate_logits.copy_(gate_logits(value).expand_as(self.prompt_gate_logits))

    def sam_frames(self, image: torch.Tensor) -> torch.Tensor:
        """Image channels (B, C, D, H, W) in nnU-Net's normalised units -> SAM 2 frames (frames.py)."""
        return slices_to_sam_frames(image, self.settings.image_size, self.intensity_windows)

    def set_click_targets(self, target: torch.Tensor) -> None:
        """The training target (B, 1, D, H, W) of the next forward, a label map whose label k + 1 is the k-th
        foreground class (nnU-Net's consecutive labels): pass 2's clicks are sampled from pass 1's errors."""
        self._click_targets = target

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """nn.Module's state dict, except that after `load_sam2_checkpoint` SAM 2's frozen weights are not in it
        but a reference to the file they came from is (sam2_reference.py): what trains, and where the rest is."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.sam2_reference is not None:
            for key in self._referenced_keys:
                del state[prefix + key]
            state[prefix + REFERENCE_KEY] = self.sam2_reference.to_tensor()
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's load, except that weights with a SAM 2 reference (see `state_dict`) load SAM 2's frozen
        weights from the file it names first (unless this network holds them already), and that the prompt gates
        of checkpoints written before their sigmoid load as their logits (`gate_logits`)."""
        # Stage-2 checkpoints written before the memory-attention adapters were left out where training cannot
        # reach them (no memory, one slice per patch) carry them at their identity start: dropping them is exact.
        own = super().state_dict().keys()
        state_dict = {key: value for key, value in state_dict.items()
                      if key in own or key == REFERENCE_KEY
                      or not (key.startswith("sam.memory_attention.") and ".adapter." in key)}
        if LEGACY_PROMPT_GATES in state_dict and PROMPT_GATE_LOGITS not in state_dict:
            state_dict[PROMPT_GATE_LOGITS] = gate_logits(state_dict.pop(LEGACY_PROMPT_GATES))
        encoded = state_dict.pop(REFERENCE_KEY, None)
        if encoded is None:
            result = super().load_state_dict(state_dict, strict=strict, assign=assign)
            if self._referenced_keys <= state_dict.keys():
                self.sam2_reference = None  # the frozen weights now are the ones given
            return result
        reference = SAM2Reference.from_tensor(encoded)
        if self.sam2_reference is None or self.sam2_reference.sha256 != reference.sha256:
            self.load_sam2_checkpoint(locate(reference))
        given = {key: value for key, value in state_dict.items() if key not in self._referenced_keys}
        result = super().load_state_dict(given, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if key not in self._referenced_keys]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys "
                               f"{missing}, unexpected keys {result.unexpected_keys}")
        return _IncompatibleKeys(missing, result.unexpected_keys)

    def load_sam2_checkpoint(self, path) -> None:
        """Load an official SAM 2.1 checkpoint of the planned model size (adapters keep their values); from then
        on the state dict references the file instead of holding SAM 2's frozen weights."""
        load_sam2_checkpoint(self.sam, path, self.settings.model_size)
        adapters = adapter_parameter_names(self.sam)
        self._referenced_keys = {f"sam.{key}" for key, value in self.sam.state_dict(keep_vars=True).items()
                                 if key not in adapters and not value.requires_grad}
        self.sam2_reference = SAM2Reference.of_file(path, self.settings.model_size)

    def compile_per_slice_step(self, **options) -> None:
        """torch.compile SAM 2's per-slice modules in place (compilation.py), the way stage 2 honours
        `nnUNet_compile`; compiling the whole network would compile the walk through the slices."""
        compile_per_slice_step(self.sam, **options)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, return_all_passes: bool | None = None):
        """Logits of the final pass, or (by default in training) a TrainingOutput with every pass.

        On CUDA, SAM 2 runs under bfloat16 autocast, or float16 where the GPU has no bfloat16 (precision.py),
        whatever autocast nnU-Net opened around it; the logits are float32 either way."""
        if return_all_passes is None:
            return_all_passes = self.training
        require_finite_intensities(x[:, :self.image_channels])  # once here: the slices' frames are made per chunk
        with sam2_precision(x.device):
            passes = self._refine(x, return_all_passes)
        return passes if return_all_passes else passes.passes[-1]

    def _object_click_targets(self, x: torch.Tensor) -> torch.Tensor | None:
        """The target given by `set_click_targets`, per object (B * K, D, H, W) bool, if this forward samples
        clicks; None otherwise. The target is consumed either way."""
        target, self._click_targets = self._click_targets, None
        if target is None or not (self.training and self.settings.train_with_clicks):
            return None
        labels = target[:, 0].to(x.device)
        per_class = torch.stack([labels == k + 1 for k in range(self.num_foreground_classes)], dim=1)
        return per_class.reshape(-1, *per_class.shape[2:])

    def _objects_to_track(self, presence: np.ndarray) -> np.ndarray:
        """Indices of the objects SAM 2 has to track, from where each one's stage-1 mask is present (N, D). In
        prediction (one image, presence from prompts), an object absent from every slice's stage-1 mask is absent
        from every result, so it costs nothing: SAM 2's logit there is ABSENT_LOGIT, and a gate in (0, 1) keeps the
        class logit between it and the prompt's -PROMPT_LOGIT, both below the background's. In training, the objects
        of `objects_per_step` classes (`_sampled_objects`)."""
        self._tracked_classes = None
        if self.training:
            return self._sampled_objects(presence.shape[0] // self.num_foreground_classes)
        if presence.shape[0] != self.num_foreground_classes or not self.departures.presence_from_prompts:
            return np.arange(presence.shape[0])
        return np.flatnonzero(presence.any(axis=1))

    def _sampled_objects(self, batch: int) -> np.ndarray:
        """The objects of `objects_per_step` foreground classes drawn uniformly at random, the same classes for every
        patch of the batch (every object when unset or not fewer than the classes); the classes left out keep their
        stage-1 logits (`_untracked_as_prompts`). Objects are independent in SAM 2, so a step on some classes is a
        step on all of them with the others' losses left out."""
        classes, per_step = self.num_foreground_classes, self.settings.objects_per_step
        if per_step is None or per_step >= classes:
            return np.arange(batch * classes)
        self._tracked_classes = np.sort(torch.randperm(classes)[:per_step].numpy())
        return (np.arange(batch)[:, None] * classes + self._tracked_classes).ravel()

    def _slices_to_walk(self, presence: np.ndarray, walk: SliceWalk) -> int:
        """How many of the first slices SAM 2 has to walk for the tracked objects, whose stage-1 masks are present
        where `presence` (N, D) says. In prediction (objects absent by their prompts skipped), slices after the
        last one where any object's mask is present give ABSENT_LOGIT whatever the memory, and their memory would
        serve no later slice; so the walk ends there, as exact as skipping absent objects (`_objects_to_track`)."""
        depth = presence.shape[1]
        if not (walk.skip_absent and walk.in_slice_order and self.departures.presence_from_prompts):
            return depth
        present = np.flatnonzero(presence.any(axis=0))
        return int(present[-1]) + 1 if len(present) else 0

    def _refine(self, x: torch.Tensor, keep_all_passes: bool = True) -> TrainingOutput:
        """The refinement passes, slice by slice: pass 1 tracks slice d (SliceWalk), the next pass corrects it
        from pass 1's result against the same memory, and the final pass's result is slice d's memory for the
        slices after it; so each slice's image features and memory attention are computed once and serve every
        pass. In training the patch's slices are encoded together; in prediction SLICES_PER_ENCODER_CALL at a
        time, so a volume's features never exist at once and memory grows with one slice and the memory bank, not
        with the volume; and the walk ends after the last slice with a stage-1 foreground (`_slices_to_walk`)."""
        batch, _, depth, height, width = x.shape
        passes = self.settings.refinement_passes
        click_targets = self._object_click_targets(x)
        stage1 = x[:, self.image_channels:]
        objects = stage1.reshape(-1, depth, height, width)  # one object per (batch item, class)
        # what Python decides (which objects, which slices, how SAM 2's calls group them) comes from this one
        # transfer, so that no slice waits for the device
        presence = (objects > 0.5).flatten(2).any(dim=2).cpu().numpy()
        tracked_host = self._objects_to_track(presence)
        tracked = object_index(tuple(tracked_host.tolist()), x.device)
        layout = HostLayout.of_boxes(presence[tracked_host])
        all_tracked = len(tracked_host) == objects.shape[0]
        predicting = not self.training
        first_prompts = None
        if self.training:
            first_prompts = self._first_pass_prompts(objects if all_tracked else objects[tracked], layout)
        walk = SliceWalk(self.sam, depth, self.settings.use_memory, self.departures,
                         first_prompts.unprompted if first_prompts is not None else frozenset(),
                         skip_absent=predicting)
        chunk = SLICES_PER_ENCODER_CALL if predicting and walk.in_slice_order else depth
        walked = self._slices_to_walk(presence[tracked_host], walk)
        walk.end_after(walked)
        kept = range(passes) if keep_all_passes else [passes - 1]
        results_device = self.results_device if predicting and self.results_device is not None else x.device
        results_dtype = self.results_dtype if predicting and self.results_dtype is not None else torch.float32
        logits = {p: torch.empty((batch, self.num_foreground_classes + 1, depth, height, width), dtype=results_dtype,
                                 device=results_device) for p in kept}
        scores = [x.new_full((objects.shape[0], depth), ABSENT_SCORE, dtype=torch.float32) for _ in range(passes)]
        features, chunk_start = None, None
        for step, d in enumerate(walk.order):
            stepping = len(tracked) > 0 and d < walked
            if stepping and (features is None or not chunk_start <= d < chunk_start + chunk):
                chunk_start = 0 if chunk == depth else d
                stop = min(walked, chunk_start + chunk)
                features = None  # the previous chunk's features go before the next ones come
                features = encode_slices(self.sam, self.sam_frames(x[:, :self.image_channels, chunk_start:stop]),
                                         stop - chunk_start)
                if first_prompts is None or chunk != depth:
                    first_prompts = self._first_pass_prompts(objects[tracked, chunk_start:stop],
                                                             layout.columns(chunk_start, stop))
            prompts, prompt_slice, out = first_prompts, d - (chunk_start or 0), None
            for refinement_pass in range(passes):
                sam_logits = torch.full((objects.shape[0], 1, height, width), ABSENT_LOGIT, device=x.device)
                if stepping:
                    out = walk.step(step, features, d - chunk_start, prompts, prompt_slice, correcting=out,
                                    remember=refinement_pass == passes - 1)
                    grid = logits_to_grid(out.low_res, (height, width))
                    if self.departures.presence_from_prompts:
                        # resampling a constant is only nearly constant in floating point: restore it exactly
                        grid = torch.where(out.present[:, None, None, None], grid, ABSENT_LOGIT)
                    sam_logits = grid if all_tracked else sam_logits.index_copy(0, tracked, grid.to(sam_logits.dtype))
                    scores[refinement_pass][tracked, d] = out.object_score[:, 0]
                slice_logits = self._class_logits(sam_logits, stage1[:, :, d:d + 1], refinement_pass)
                if refinement_pass in logits:
                    logits[refinement_pass][:, :, d:d + 1] = slice_logits
                if refinement_pass + 1 < passes and stepping:
                    prompts = self._next_pass_prompts(slice_logits, out, tracked, click_targets, d,
                                                      layout.columns(d, d + 1))
                    prompt_slice = 0
            if predicting and self.slice_progress is not None:
                self.slice_progress(1)
        return TrainingOutput([logits[p] for p in kept],
                              [scores[p].reshape(batch, self.num_foreground_classes, depth) for p in kept])

    def _first_pass_prompts(self, objects: torch.Tensor, layout: HostLayout | None = None) -> ObjectPrompts:
        """Boxes and masks from the stage-1 masks (N, D, H, W), whose presence `layout` holds on the host (if
        given); in training jittered and made sparser."""
        prompts = prompts_from_masks(objects, self.settings.image_size,
                                     jitter=self.settings.box_jitter if self.training else 0.0, layout=layout)
        if self.training and self.settings.use_memory and self.settings.training_prompt_dropout > 0:
            prompts = drop_training_prompts(prompts, self.settings.training_prompt_dropout)
        return prompts

    def _next_pass_prompts(self, slice_logits: torch.Tensor, out: SliceOutput, tracked: torch.Tensor,
                           click_targets: torch.Tensor | None, d: int,
                           first_layout: HostLayout | None = None) -> ObjectPrompts:
        """The next pass's prompts on slice d, from this pass's result there (no gradient through a prompt).

        In prediction, with presence from prompts, an object absent from the first pass's prompts on the slice
        has ABSENT_LOGIT there and so no mask in the next pass: the first pass's layout bounds the next one's,
        whose objects may still turn out absent on the device (`HostLayout.presence_on_device`). In training
        (slices left to memory, clicks), the layout is read from the device."""
        size = self.settings.image_size
        height, width = slice_logits.shape[-2:]
        predicted = slice_logits[:, 1:].detach().reshape(-1, 1, height, width)[tracked] > BACKGROUND_LOGIT
        # SAM 2's own logits are its mask prompt (as Meta feeds them back), unless the result is the gated mix,
        # whose mask then prompts like a stage-1 mask
        mask_logits = masks_to_prompt_logits(predicted, size // MASK_PROMPT_STRIDE) \
            if self.prompt_gate_logits is not None else out.low_res.detach()
        bounded = (first_layout is not None and not self.training and self.departures.presence_from_prompts
                   and click_targets is None)
        layout = HostLayout.of_boxes(~first_layout.absent, presence_on_device=True) if bounded else None
        prompts = prompts_from_masks(predicted, size, mask_logits=mask_logits, layout=layout)
        if click_targets is not None:
            prompts = add_error_clicks(prompts, predicted, click_targets[tracked, d:d + 1], size)
        return prompts

    def _class_logits(self, sam_logits: torch.Tensor, stage1: torch.Tensor, refinement_pass: int) -> torch.Tensor:
        """SAM 2's per-object logits (N, D, H, W) -> class logits (B, K + 1, D, H, W), gated with the stage-1
        masks (B, K, D, H, W) when the refinement starts at its prompt."""
        per_class = sam_logits.float().reshape(stage1.shape)
        prompt = (2 * stage1.float() - 1) * PROMPT_LOGIT
        if self.prompt_gate_logits is not None:
            gate = torch.sigmoid(self.prompt_gate_logits[refinement_pass]).reshape(1, -1, 1, 1, 1)
            per_class = prompt + gate * (per_class - prompt)
        per_class = self._untracked_as_prompts(per_class, prompt)
        background = torch.full_like(per_class[:, :1], BACKGROUND_LOGIT)
        return torch.cat([background, per_class], dim=1)

    def _untracked_as_prompts(self, per_class: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The classes SAM 2 did not track in this training step (`objects_per_step`) keep their stage-1 logits,
        with no gradient into their gates: SAM 2 said nothing about them that the loss could judge."""
        if self._tracked_classes is None:
            return per_class
        tracked = tuple(k in self._tracked_classes for k in range(per_class.shape[1]))
        # torch.where passes no gradient to the branch it does not take
        return torch.where(device_constant(tracked, torch.bool, per_class.device).reshape(1, -1, 1, 1, 1),
                           per_class, prompt)
