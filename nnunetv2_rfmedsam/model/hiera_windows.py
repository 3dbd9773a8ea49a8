"""How much of Hiera's windowed attention is zero padding at a given SAM 2 input size.

Hiera (`sam2/modeling/backbones/hieradet.py`) splits each stage's token grid into square windows
(`window_partition` in `backbones/utils.py`) and pads the grid with zeros up to a multiple of the
window; attention masks nothing, so padded tokens are attended to as keys. The image encoder stays
frozen here, and it saw padding only as it occurs at the size it was trained at (the config's
`model.image_size`, 1024). Everything below is read from sam2's packaged model config and Hiera's
own defaults, replaying the block layout of `Hiera.__init__`:

- block i uses `window_spec[stage - 1]` of the stage it starts in; the first block of a stage (the one
  that pools queries) still windows the previous stage's grid with the previous stage's window;
- blocks in `global_att_blocks` attend globally (no windows, no padding);
- the patch embedding (a strided convolution) makes the first grid, each query-pooling block halves it.

Only the key side of a window is counted: the pooled queries of a padded window are cropped again.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import lru_cache

from nnunetv2_rfmedsam.settings import IMAGE_SIZE_MULTIPLE, SAM2_MODELS, validate_image_size, validate_model_size

# warn when the last window along a row or column of some stage is more than this share of zeros, and more
# than at the trained size
HEAVY_PADDING = 1 / 3


@dataclass(frozen=True)
class WindowedGrid:
    """One stage's token grid as its windowed attention blocks see it."""
    stage: int            # 1 = the patch-embedding grid (S / 4), each later stage half the previous one
    grid: int             # tokens per side
    window: int           # window side in tokens
    blocks: tuple         # indices of the trunk blocks that window this grid

    @property
    def windows_per_side(self) -> int:
        return math.ceil(self.grid / self.window)

    @property
    def padding(self) -> int:
        """Zero tokens added at the end of each row and column."""
        return self.windows_per_side * self.window - self.grid

    @property
    def edge_window_padding(self) -> float:
        """Share of zeros in the last window of a row (or column), not in the corner."""
        return self.padding / self.window

    @property
    def corner_window_padding(self) -> float:
        """Share of zeros in the corner window (padded along both axes)."""
        return 1 - (1 - self.edge_window_padding) ** 2

    @property
    def padded_share(self) -> float:
        """Share of zeros among all tokens of the padded grid."""
        return 1 - (self.grid / (self.windows_per_side * self.window)) ** 2


@lru_cache(maxsize=None)
def trunk_config(model_size: str) -> tuple:
    """(trunk arguments with Hiera's defaults filled in, patch-embedding arguments, trained image size)."""
    validate_model_size(model_size)
    from hydra import compose  # sam2's import initialises Hydra with its packaged configs
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.utils import PatchEmbed
    from omegaconf import OmegaConf

    config = compose(config_name=SAM2_MODELS[model_size][0])
    written = OmegaConf.to_container(config.model.image_encoder.trunk, resolve=True)
    trunk = {name: p.default for name, p in inspect.signature(Hiera.__init__).parameters.items()
             if p.default is not inspect.Parameter.empty}
    trunk.update({k: v for k, v in written.items() if not k.startswith("_")})
    # Hiera builds its PatchEmbed with the defaults (only embed_dim is passed)
    patch = {name: p.default for name, p in inspect.signature(PatchEmbed.__init__).parameters.items()
             if p.default is not inspect.Parameter.empty}
    return trunk, patch, int(config.model.image_size)


def trained_image_size(model_size: str) -> int:
    return trunk_config(model_size)[2]


def windowed_grids(model_size: str, image_size: int) -> list[WindowedGrid]:
    """Per stage grid and window size, the trunk blocks that attend in windows, at input `image_size`."""
    validate_image_size(image_size)
    trunk, patch, _ = trunk_config(model_size)
    stages, window_spec = list(trunk["stages"]), list(trunk["window_spec"])
    global_blocks = trunk["global_att_blocks"]
    q_stride = trunk["q_stride"][0]
    stage_ends = [sum(stages[:i]) - 1 for i in range(1, len(stages) + 1)]
    q_pool_blocks = [end + 1 for end in stage_ends[:-1]][:trunk["q_pool"]]
    grid = (image_size + 2 * patch["padding"][0] - patch["kernel_size"][0]) // patch["stride"][0] + 1

    found: dict = {}
    cur_stage, grid_stage = 1, 1
    for i in range(sum(stages)):  # as in Hiera.__init__
        window = window_spec[cur_stage - 1]
        if global_blocks is not None and i in global_blocks:
            window = 0
        if i - 1 in stage_ends:
            cur_stage += 1
        if window > 0:
            found.setdefault((grid_stage, grid, window), []).append(i)
        if i in q_pool_blocks:  # MaxPool2d(q_stride, ceil_mode=False) of the queries
            grid //= q_stride
            grid_stage += 1
    return [WindowedGrid(stage, g, w, tuple(blocks)) for (stage, g, w), blocks in found.items()]


def unpadded_multiple(model_size: str) -> int:
    """The input sizes that pad no window at any stage are the multiples of this number."""
    trained = trained_image_size(model_size)
    multiple = IMAGE_SIZE_MULTIPLE
    for grid in windowed_grids(model_size, trained):
        stride = trained // grid.grid  # input pixels per token at that stage
        multiple = math.lcm(multiple, stride * grid.window)
    return multiple


def padding_warning(model_size: str, image_size: int, threshold: float = HEAVY_PADDING) -> str | None:
    """A one-line warning when some stage's edge windows are more than `threshold` zeros and more padded than
    at the trained size (the frozen encoder never saw such windows), else None.

    Compared with the trained size, not with the threshold alone: at 1024, tiny's stage-3 and stage-4 edge
    windows are already 6/14 and 3/7 zeros, and that is what the checkpoints were trained with."""
    trained = {(g.stage, g.window): g.edge_window_padding for g in windowed_grids(model_size, trained_image_size(model_size))}
    worst = None
    for g in windowed_grids(model_size, image_size):
        if g.edge_window_padding > max(threshold, trained.get((g.stage, g.window), 0.0)):
            if worst is None or g.edge_window_padding > worst.edge_window_padding:
                worst = g
    if worst is None:
        return None
    at_trained = trained.get((worst.stage, worst.window), 0.0)
    return (f"SAM 2 input size {image_size} pads Hiera's attention windows heavily for the {model_size} model: at "
            f"stage {worst.stage} ({worst.grid}x{worst.grid} tokens, windows of {worst.window}) the windows along the "
            f"grid's right and bottom edges are {worst.edge_window_padding:.0%} zeros ({at_trained:.0%} at "
            f"{trained_image_size(model_size)}, as trained), which the frozen encoder never saw; multiples of "
            f"{unpadded_multiple(model_size)} pad no window")
