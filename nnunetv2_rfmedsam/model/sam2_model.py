"""SAM 2.1 at the planned model size and input size, built by sam2's own builder.

Input size: SAM 2's configs are written for 1024 x 1024 frames. Parameter shapes do not depend on the
input size, so the official 1024 checkpoints load at any multiple of 32. What does depend on it:
- `model.image_size`: the prompt encoder's embedding grid (`sam_image_embedding_size` = S / 16), its mask
  prompt size (S / 4) and the size of the high-resolution masks given to the memory encoder (S);
- the memory-attention RoPE tables (`feat_sizes`), precomputed for the S / 16 grid (RoPEAttention would
  otherwise replace the configured 64 x 64 tables inside its first forward call).
Everything else adapts by itself: Hiera interpolates its position embedding and pads its windows, the
memory encoder's mask downsampler has a fixed total stride of 16 (S -> S / 16, the feature grid), the sine
position encodings are computed per feature size, and `maskmem_tpos_enc` is per memory slot, not per pixel.
"""
from __future__ import annotations

from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base

from nnunetv2_rfmedsam.model.precision import cuda_hidden
from nnunetv2_rfmedsam.settings import SAM2_MODELS, validate_image_size, validate_model_size

# SAM 2's image features (and memories) are on a grid 16 times coarser than the input frame
BACKBONE_STRIDE = 16


def sam2_hydra_overrides(image_size: int) -> list[str]:
    """The overrides of the packaged SAM 2.1 config that set the input size to `image_size`."""
    validate_image_size(image_size)
    grid = image_size // BACKBONE_STRIDE
    return [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]",
    ]


def build_sam2_model(model_size: str, image_size: int, device: str = "cpu") -> SAM2Base:
    """A randomly initialised SAM 2.1 model (weights come from `sam2_checkpoint.load_sam2_checkpoint`).

    `apply_postprocessing=False`: sam2's post-processing switches on `dynamic_multimask_via_stability`,
    which in eval mode only may swap the single-mask output for one of the multimask outputs. The refiner
    is trained on the single-mask output, so evaluation must decode the same way.
    """
    validate_model_size(model_size)
    with cuda_hidden():
        model = build_sam2(SAM2_MODELS[model_size][0], ckpt_path=None, device=device, mode="train",
                           hydra_overrides_extra=sam2_hydra_overrides(image_size), apply_postprocessing=False)
    return model
