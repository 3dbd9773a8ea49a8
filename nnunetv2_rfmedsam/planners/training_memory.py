"""How much GPU memory a stage-2 training step needs, estimated from the plans' numbers alone.

A step holds SAM 2's parameters (float32, all of them), the gradients and AdamW's two moments of the trainable ones,
and the activations autograd saves for the backward pass. The activations dominate and grow with

- the slice images (batch x slices_per_patch): the image encoder runs once per slice, with adapters in it, so all
  of Hiera's activations are kept; per input pixel, plus the zero tokens Hiera's windows pad at sizes that are not
  multiples of its windows (model/hiera_windows.py);
- the objects' slices (objects = batch x classes tracked per step): memory attention, the memory encoder and the
  mask decoder run per object and slice, and the mask decoder once more per refinement pass; per input pixel;
- the memories each object's slices read: memory attention's keys and values, (S/16)^2 tokens per memory, from
  slice 0 and the num_maskmem - 1 slices before;
- the patch grid: the logits of every pass on nnU-Net's patch (classes x slices x in-plane voxels) and the loss.

The coefficients are bytes saved for backward per unit of each term, counted on the CPU in float32 with
`torch.autograd.graph.saved_tensors_hooks` over a real training forward and loss (scripts/measure_training_memory.py
measures them and fits them by non-negative least squares; `measure_saved_activation_bytes` is its counter).

Attention: on the CPU, torch 2.14's scaled_dot_product_attention saves only q, k, v, its output and a log-sum-exp
(its flash kernel) without dropout, but with dropout it falls back to the math kernel, which saves the softmax, the
dropout mask and their product, three matrices of queries x keys each. SAM 2's memory attention has dropout 0.1 in
training: at input 1024 its cross attention would keep 4096 x 28,672 floats three times per layer, object and
slice. A GPU never does: its flash and memory-efficient kernels support dropout and save what the CPU's flash kernel
saves (plus a random seed). So the measurements turn attention dropout off, and the estimate has no term quadratic
in tokens; it is linear in the input's pixels, as the GPU's memory is.

An upper bound on a GPU: SAM 2 trains there under 16-bit autocast (model/precision.py), which saves 16-bit copies
of most of these tensors; counted on the CPU under bfloat16 autocast, a step saved 0.74 of its float32 bytes (input
256, batch 1, 3 slices, 2 classes; the frozen weights' 16-bit copies autocast keeps for each call included). Left
out: the CUDA context, cuDNN's workspaces and the allocator's fragmentation, which `RUNTIME_RESERVE_BYTES` stands
for.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch

from nnunetv2_rfmedsam.settings import SAM2Settings

GIB = 2 ** 30
# bytes per trainable parameter beyond the parameter itself: its float32 gradient and AdamW's exp_avg and exp_avg_sq
GRADIENT_BYTES, ADAMW_STATE_BYTES = 4, 8
# the CUDA context (~0.5 GB), cuDNN and cuBLAS workspaces and the caching allocator's fragmentation: not tensors
# autograd saves, so not measured; a GPU's usual order of magnitude for them
RUNTIME_RESERVE_BYTES = 1.5 * GIB
# memories SAM 2 reads per slice (sam2.1 configs, every model size): slice 0's and the last num_maskmem - 1
NUM_MASKMEM = 7


@dataclass(frozen=True)
class ActivationCoefficients:
    """Bytes saved for backward per unit of each activation term (`activation_terms` defines the units)."""

    slice_image_pixel: float       # per slice image and input pixel: the image encoder
    padded_token_channel: float    # per slice image, zero token Hiera's windows pad, block and channel
    object_slice_pixel: float      # per object, slice and input pixel: memory attention, memory encoder
    object_pass_pixel: float       # per object, slice, refinement pass and input pixel: prompts, mask decoder
    memory_read_pixel: float       # per object, memory read on a slice, and input pixel: memory keys and values
    class_grid_voxel: float        # per class of a batch item, slice, pass and patch voxel: logits and loss


@dataclass(frozen=True)
class ModelMemory:
    """What one SAM 2 model size costs in training: parameter counts at the default settings (adapter width 32,
    memory-attention adapters, object-score head trained) and its activation coefficients."""

    parameters: int
    trainable: int
    activations: ActivationCoefficients
    # how the coefficients were obtained: measured for this size, or taken from another one (say which)
    source: str


# Printed by scripts/measure_training_memory.py (CPU, float32, torch 2.14, sam2 1.1.0; the fits are within 3.2% of
# their 12 points each; for tiny, a step at input 1024, batch 1, 2 slices, 1 class measured 4.53 GiB against 4.66
# estimated). The object terms (memory attention, memory encoder, mask decoder: the same modules in every size)
# agree between the sizes to within 3%.
MODEL_MEMORY = {
    "tiny": ModelMemory(parameters=39549540, trainable=1352323, activations=ActivationCoefficients(
        slice_image_pixel=1767, padded_token_channel=28.65, object_slice_pixel=240, object_pass_pixel=136.3,
        memory_read_pixel=123.7, class_grid_voxel=16.88), source="measured"),
    "small": ModelMemory(parameters=46756196, trainable=1461123, activations=ActivationCoefficients(
        slice_image_pixel=2064, padded_token_channel=27.19, object_slice_pixel=238.2, object_pass_pixel=139.7,
        memory_read_pixel=122.8, class_grid_voxel=15.1), source="measured"),
    "base_plus": ModelMemory(parameters=81860100, trainable=1775203, activations=ActivationCoefficients(
        slice_image_pixel=3387, padded_token_channel=26.3, object_slice_pixel=235.3, object_pass_pixel=143.9,
        memory_read_pixel=120.9, class_grid_voxel=13.27), source="measured"),
}
# large: not measured (the fit's measurements ran out of this machine's memory). The image term extrapolated from the
# three measured sizes, whose per-pixel image coefficients grow linearly (519 + 52 x) with Hiera's channels per
# input pixel summed over blocks, x = sum over blocks of C_stage / (16 * 4^(stage-1)): tiny 24, small 30,
# base_plus 55.1, large 130.5; the other terms base_plus's (large pads no window at 1024 anyway).
MODEL_MEMORY["large"] = ModelMemory(
    parameters=226604628, trainable=2923267,
    activations=replace(MODEL_MEMORY["base_plus"].activations, slice_image_pixel=7305),
    source="extrapolated from tiny, small and base_plus")


def memory_reads(slices_per_patch: int, use_memory: bool = True) -> int:
    """Memories read over one object's slices: slice d > 0 reads slice 0's and those of the num_maskmem - 1 slices
    before it (the last slice writes none; in training only slice 0 is a conditioning frame)."""
    if not use_memory:
        return 0
    return sum(min(d, NUM_MASKMEM) for d in range(1, slices_per_patch))


def padded_token_channels(model_size: str, image_size: int) -> int:
    """Per slice image, the zero tokens Hiera's windowed blocks pad their grids with, times blocks and channels."""
    from nnunetv2_rfmedsam.model.hiera_windows import trunk_config, windowed_grids
    trunk = trunk_config(model_size)[0]
    total = 0
    for grid in windowed_grids(model_size, image_size):
        channels = int(trunk["embed_dim"] * trunk["dim_mul"] ** (grid.stage - 1))
        padded = (grid.windows_per_side * grid.window) ** 2 - grid.grid ** 2
        total += padded * len(grid.blocks) * channels
    return total


def activation_terms(settings: SAM2Settings, batch_size: int, num_classes: int, patch_grid: tuple[int, int],
                     objects_per_step: int | None = None) -> dict:
    """The units of `ActivationCoefficients` for one training step. `num_classes`: foreground classes;
    `patch_grid`: nnU-Net's in-plane patch size; `objects_per_step`: classes SAM 2 tracks per step (default: the
    settings')."""
    tracked = objects_per_step if objects_per_step is not None else settings.objects_per_step
    tracked = num_classes if tracked is None else min(tracked, num_classes)
    pixels = settings.image_size ** 2
    images = batch_size * settings.slices_per_patch
    objects = batch_size * tracked
    passes = settings.refinement_passes
    return {
        "slice_image_pixel": images * pixels,
        "padded_token_channel": images * padded_token_channels(settings.model_size, settings.image_size),
        "object_slice_pixel": objects * settings.slices_per_patch * pixels,
        "object_pass_pixel": objects * settings.slices_per_patch * passes * pixels,
        "memory_read_pixel": objects * memory_reads(settings.slices_per_patch, settings.use_memory) * pixels,
        # every class's logits are kept and enter the loss, tracked or not
        "class_grid_voxel": batch_size * num_classes * settings.slices_per_patch * passes * patch_grid[0] *
        patch_grid[1],
    }


def activation_bytes(coefficients: ActivationCoefficients, terms: dict) -> float:
    return sum(getattr(coefficients, f.name) * terms[f.name] for f in fields(ActivationCoefficients))


@dataclass(frozen=True)
class TrainingMemoryEstimate:
    """A training step's memory in bytes, by part."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    reserve: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.reserve

    def to_plans(self) -> dict:
        """In GB (2^30 bytes), rounded, as the plans record it."""
        parts = {f.name: round(getattr(self, f.name) / GIB, 2) for f in fields(self)}
        return {"total": round(self.total / GIB, 2), **parts}


def estimate_training_memory(settings: SAM2Settings, batch_size: int, num_classes: int,
                             patch_grid: tuple[int, int]) -> TrainingMemoryEstimate:
    """The memory of one stage-2 training step with these settings, `batch_size` patches, `num_classes` foreground
    classes and an in-plane patch grid `patch_grid` (see the module's docstring for what it covers)."""
    model = MODEL_MEMORY[settings.model_size]
    terms = activation_terms(settings, batch_size, num_classes, patch_grid)
    return TrainingMemoryEstimate(parameters=4 * model.parameters, gradients=GRADIENT_BYTES * model.trainable,
                                  optimizer=ADAMW_STATE_BYTES * model.trainable,
                                  activations=activation_bytes(model.activations, terms),
                                  reserve=RUNTIME_RESERVE_BYTES)


@contextlib.contextmanager
def attention_dropout_off(network):
    """SAM 2's attention modules without dropout, so that the CPU picks the attention kernel a GPU uses (see the
    module's docstring); dropout layers outside attention keep theirs."""
    modules = [m for m in network.modules() if hasattr(m, "dropout_p")]
    saved = [m.dropout_p for m in modules]
    for m in modules:
        m.dropout_p = 0.0
    try:
        yield
    finally:
        for m, p in zip(modules, saved):
            m.dropout_p = p


def saved_tensor_bytes(step, excluded_storages: set[int] = frozenset()) -> int:
    """Bytes of the storages autograd saves for backward while `step()` runs, each storage counted once (saved
    tensors often are views of one storage), leaving out `excluded_storages` (data pointers: the parameters)."""
    held = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        # holding the tensor keeps its storage's address from being reused by a later one
        held[storage.data_ptr()] = (tensor, storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(size for pointer, (_, size) in held.items() if pointer not in excluded_storages)


def measure_saved_activation_bytes(settings: SAM2Settings, batch_size: int, num_classes: int,
                                   patch_grid: tuple[int, int], seed: int = 0) -> int:
    """Bytes saved for backward by one stage-2 training step on the CPU: RFMedSAM2Network in training mode, its
    click targets set as the trainer sets them, the trainer's loss (nnU-Net's Dice + CE on every pass and the
    presence loss). Every class is present on every slice, as a square stage-1 mask and a shifted target, so that
    every object is tracked and prompted on every slice."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2_rfmedsam.model.network import RFMedSAM2Network
    from nnunetv2_rfmedsam.trainers.passes_loss import RefinementPassesLoss

    torch.manual_seed(seed)
    network = RFMedSAM2Network(1 + num_classes, num_classes + 1, **settings.to_plans()).train()
    loss = RefinementPassesLoss(DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                               {}, weight_ce=1, weight_dice=1,
                                               dice_class=MemoryEfficientSoftDiceLoss),
                                settings.presence_loss_weight)
    depth, (height, width) = settings.slices_per_patch, patch_grid
    x = torch.zeros(batch_size, 1 + num_classes, depth, height, width)
    x[:, 0] = torch.randn(batch_size, depth, height, width)
    target = torch.zeros(batch_size, 1, depth, height, width)
    side = max(2, min(height, width) // 3)
    for k in range(num_classes):
        top = (k * side // 2) % max(1, height - side - 1)
        x[:, 1 + k, :, top:top + side, top:top + side] = 1
        target[:, 0, :, top + 1:top + 1 + side, top:top + side] = k + 1
    parameters = {t.untyped_storage().data_ptr() for t in [*network.parameters(), *network.buffers()]}

    def step():
        network.set_click_targets(target)
        loss(network(x), target)

    with attention_dropout_off(network):
        return saved_tensor_bytes(step, parameters)
