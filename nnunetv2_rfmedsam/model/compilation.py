"""torch.compile for stage 2: SAM 2's per-slice modules, not the walk through the slices.

What repeats in stage 2 is one slice's step: SAM 2's image encoder, memory attention, prompt encoder, mask decoder
and memory encoder. The walk around them (network.py, refinement.py) is Python that decides per slice which
objects run and which memories they read; compiled whole (what `nnUNet_compile=t` does to any network), dynamo
breaks its graph at every such decision and recompiles for every slice index and memory-bank layout until it hits
its recompile limit. So, as sam2's own `SAM2VideoPredictorVOS` does, only the modules are compiled, each on its
own, and the walk calls them as it always does.

What still varies between calls: the number of objects (a slice's classes), of memories (the bank fills over the
first slices) and the images per encoder call (the last chunk of a volume). Dynamo's automatic dynamic shapes make
such a dimension symbolic once it has seen two values; sizes 0 and 1 stay specialised. The inputs are made
contiguous first: the walk hands SAM 2 views (one slice's features expanded over its objects, as SAM2VideoPredictor
does), and dynamo would otherwise guard on each view's strides and offsets and recompile for each kind of view.
The copy is one slice's features per object, small beside the step.

Not `mode="max-autotune"` as sam2's VOS predictor uses: that mode replays CUDA graphs, whose outputs are
overwritten by the next replay, and the walk keeps outputs (memories, conditioned features) across slices.
"""
from __future__ import annotations

import functools

import torch
from torch.utils._pytree import tree_map_only

# SAM 2's modules that run once per slice (the image encoder once per slice, the others once per slice and group
# of objects)
PER_SLICE_MODULES = ("image_encoder", "memory_attention", "sam_prompt_encoder", "sam_mask_decoder", "memory_encoder")
# the backend torch.compile uses for them (tests swap in a counting backend)
DEFAULT_BACKEND = "inductor"
_COMPILED = "_rfmedsam2_compiled_forward"


def _contiguous(tree):
    return tree_map_only(torch.Tensor, lambda t: t.contiguous(), tree)


def compile_per_slice_step(sam_model: torch.nn.Module, backend=None, **options) -> None:
    """Compile each of SAM 2's PER_SLICE_MODULES of `sam_model` in place (its forward; the weights and the state
    dict stay the module's own). Compiling twice is a no-op. `options` go to torch.compile."""
    for name in PER_SLICE_MODULES:
        module = getattr(sam_model, name)
        if hasattr(module, _COMPILED):
            continue
        compiled = torch.compile(module.forward, backend=backend or DEFAULT_BACKEND, **options)

        @functools.wraps(module.forward)
        def forward(*args, _compiled=compiled, **kwargs):
            return _compiled(*_contiguous(args), **_contiguous(kwargs))

        setattr(module, _COMPILED, compiled)
        module.forward = forward


def is_compiled(sam_model: torch.nn.Module) -> bool:
    """Whether `compile_per_slice_step` compiled `sam_model`'s modules."""
    return all(hasattr(getattr(sam_model, name), _COMPILED) for name in PER_SLICE_MODULES)
