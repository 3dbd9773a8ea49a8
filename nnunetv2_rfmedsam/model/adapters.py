"""RFMedSAM 2's adapters, where they go in SAM 2, and which parameters train.

Placement (each adapter starts as the identity, so an adapted model first computes exactly what SAM 2 does):
- Hiera image encoder: a DWConvAdapter after the attention of every block, at the block's output width
  (`dim_out`: the first block of a stage widens the tokens). Windowed blocks run their attention on
  window-partitioned tokens, so the adapter sees (and its 3x3 depth-wise conv mixes within) one window at a
  time; the global-attention blocks give it the whole feature map.
- FPN neck: a CNNAdapter after each lateral convolution (`FpnNeck.convs`).
- Memory attention: a DWConvAdapter after the self-attention and after the cross-attention to memories of
  every layer; both outputs are the current slice's S/16 x S/16 feature grid. Only where training runs memory
  attention (`memory_attention=False` otherwise: memory off, or one slice per patch, whose slice is a
  conditioning frame without memories): an adapter that gets no gradient stops DDP at its second step, and an
  untrained one would be the identity anyway.
- Mask decoder: a DWConvAdapter after `cross_attn_image_to_token` of each two-way block, whose output is the
  S/16 x S/16 image-token grid. The block's other two attentions (self-attention of the prompt tokens, and
  tokens-to-image) output the handful of sparse prompt/output tokens, which have no spatial layout for a
  depth-wise convolution to act on.
The memory encoder gets none (the paper names only the encoder, memory attention and decoder).

An attention's adapter is registered as its child `adapter` and applied by a forward hook, rather than by
wrapping the attention in a new module: the SAM 2 parameter names stay as in the official checkpoints, so
those load into an adapted model directly (the adapter parameters are simply additional keys).
"""
from __future__ import annotations

import torch
from torch import nn
from sam2.modeling.sam2_base import SAM2Base

# the mask decoder's parts trained beside the adapters; everything else of SAM 2 stays frozen.
# The heads that produce mask logits train with nnU-Net's loss. The object-score head and its token train with the
# presence loss (trainers/passes_loss.py), as Meta trains them: they decide presence on slices left to memory.
# The IoU head stays frozen: it only ranks the three candidate masks of a slice with one click or none, and the
# loss supervises the chosen mask alone, which gives no IoU targets for the others.
TRAINABLE_DECODER_HEADS = ("output_hypernetworks_mlps", "output_upscaling")
OBJECT_SCORE_PARTS = ("pred_obj_score_head", "obj_score_token")


class DWConvAdapter(nn.Module):
    """LayerNorm -> Linear (dim -> width) -> point-wise conv -> 3x3 depth-wise conv -> GELU -> LayerNorm ->
    point-wise conv (width -> dim), added to its input.

    Takes channels-last token grids (N, H, W, dim), or token sequences (N, H * W, dim) in row-major order
    when built with `token_grid=(H, W)`.
    """

    def __init__(self, dim: int, width: int, token_grid: tuple[int, int] | None = None):
        super().__init__()
        self.token_grid = token_grid
        self.norm_in = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, width)
        self.pointwise = nn.Conv2d(width, width, kernel_size=1)
        self.depthwise = nn.Conv2d(width, width, kernel_size=3, padding=1, groups=width)
        self.act = nn.GELU()
        self.norm_mid = nn.LayerNorm(width)
        self.up = nn.Conv2d(width, dim, kernel_size=1)
        # zero output projection: the adapter starts as the identity
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return self.forward_grid(x.unflatten(1, self.token_grid)).flatten(1, 2)
        return self.forward_grid(x)

    def forward_grid(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(self.norm_in(x)).permute(0, 3, 1, 2)
        y = self.act(self.depthwise(self.pointwise(y)))
        y = self.norm_mid(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.up(y).permute(0, 2, 3, 1)


class CNNAdapter(nn.Module):
    """Point-wise conv (channels -> width) -> 3x3 depth-wise conv -> GELU -> point-wise conv (width ->
    channels), added to its input; on channels-first maps (N, channels, H, W)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.down = nn.Conv2d(channels, width, kernel_size=1)
        self.depthwise = nn.Conv2d(width, width, kernel_size=3, padding=1, groups=width)
        self.act = nn.GELU()
        self.up = nn.Conv2d(width, channels, kernel_size=1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.depthwise(self.down(x))))


ADAPTER_TYPES = (DWConvAdapter, CNNAdapter)


def _apply_adapter(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    # a module-level function that finds the adapter through the hooked module: a deep copy of the model
    # then uses its own adapter copy, where a closure would keep calling the original's
    return module.adapter(output)


def _attach_after(attention: nn.Module, adapter: DWConvAdapter) -> DWConvAdapter:
    if hasattr(attention, "adapter"):
        raise RuntimeError(f"{type(attention).__name__} already has an adapter: adapters are injected once")
    attention.adapter = adapter
    attention.register_forward_hook(_apply_adapter)
    return adapter


def inject_adapters(sam_model: SAM2Base, width: int, memory_attention: bool = True) -> list[nn.Module]:
    """Add RFMedSAM 2's adapters to `sam_model` in place (see the module docstring); returns them."""
    adapters = []
    for block in sam_model.image_encoder.trunk.blocks:
        adapters.append(_attach_after(block.attn, DWConvAdapter(block.dim_out, width)))

    neck = sam_model.image_encoder.neck
    for lateral in neck.convs:  # an nn.Sequential holding `conv`: the adapter runs after it
        adapter = CNNAdapter(neck.d_model, width)
        lateral.add_module("adapter", adapter)
        adapters.append(adapter)

    grid = (sam_model.sam_image_embedding_size, sam_model.sam_image_embedding_size)
    for layer in sam_model.memory_attention.layers if memory_attention else ():
        adapters.append(_attach_after(layer.self_attn, DWConvAdapter(layer.d_model, width, grid)))
        adapters.append(_attach_after(layer.cross_attn_image, DWConvAdapter(layer.d_model, width, grid)))

    transformer = sam_model.sam_mask_decoder.transformer
    for block in transformer.layers:
        adapters.append(_attach_after(block.cross_attn_image_to_token,
                                      DWConvAdapter(transformer.embedding_dim, width, grid)))
    return adapters


def adapter_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, ADAPTER_TYPES)]


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """The names, in `model.state_dict()`, of every adapter tensor."""
    prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, ADAPTER_TYPES))
    return {key for key in model.state_dict() if key.startswith(prefixes)}


def freeze_for_finetuning(sam_model: SAM2Base, train_object_score: bool = True) -> None:
    """Freeze SAM 2 except its adapters, the mask decoder's output heads and (if `train_object_score`) its
    object-score head and token."""
    sam_model.requires_grad_(False)
    for adapter in adapter_modules(sam_model):
        adapter.requires_grad_(True)
    for name in TRAINABLE_DECODER_HEADS + (OBJECT_SCORE_PARTS if train_object_score else ()):
        head = getattr(sam_model.sam_mask_decoder, name, None)
        if head is not None:
            head.requires_grad_(True)
