"""Hiera's window padding per SAM 2 input size, read off sam2's configs and checked against Hiera itself."""
import pytest
import torch

from nnunetv2_rfmedsam.cli.plan_and_preprocess import IMAGE_SIZE_HELP
from nnunetv2_rfmedsam.model.hiera_windows import (padding_warning, trained_image_size, unpadded_multiple,
                                                   windowed_grids)
from nnunetv2_rfmedsam.settings import SAM2_MODELS

SIZES = (128, 224, 256, 448, 512, 896, 1024)
# (stage, tokens per side, window, zero tokens per row and column) of the padded stages; stages 1 and 2
# (windows 8 and 4 on S/4 and S/8) are never padded at multiples of 32
PADDED = {
    "tiny": {128: [(3, 8, 14, 6), (4, 4, 7, 3)], 224: [], 256: [(3, 16, 14, 12), (4, 8, 7, 6)], 448: [],
             512: [(3, 32, 14, 10), (4, 16, 7, 5)], 896: [], 1024: [(3, 64, 14, 6), (4, 32, 7, 3)]},
    "large": {128: [(3, 8, 16, 8), (4, 4, 8, 4)], 224: [(3, 14, 16, 2), (4, 7, 8, 1)], 256: [],
              448: [(3, 28, 16, 4), (4, 14, 8, 2)], 512: [], 896: [(3, 56, 16, 8), (4, 28, 8, 4)], 1024: []},
}


def padded(model_size, size):
    return [(g.stage, g.grid, g.window, g.padding) for g in windowed_grids(model_size, size) if g.padding]


@pytest.mark.parametrize("size", SIZES)
def test_padding_figures(size):
    assert padded("tiny", size) == PADDED["tiny"][size]
    # small and base_plus have tiny's windows (the packaged configs keep Hiera's default window_spec)
    assert padded("small", size) == padded("base_plus", size) == PADDED["tiny"][size]
    assert padded("large", size) == PADDED["large"][size]


def test_share_of_zeros_and_unpadded_sizes():
    stage3 = {s: g for s in (128, 256, 512, 1024) for g in windowed_grids("tiny", s) if g.stage == 3}
    assert [round(stage3[s].edge_window_padding, 3) for s in (128, 256, 512, 1024)] == [0.429, 0.857, 0.714, 0.429]
    assert round(stage3[1024].corner_window_padding, 3) == 0.673  # 8 x 8 real tokens in a 14 x 14 window
    assert round(stage3[1024].padded_share, 3) == 0.164  # 64^2 tokens padded to 70^2
    assert {m: unpadded_multiple(m) for m in SAM2_MODELS} == {"tiny": 224, "small": 224, "base_plus": 224,
                                                             "large": 256}
    assert all(trained_image_size(m) == 1024 for m in SAM2_MODELS)
    # the help text quotes these figures (argparse help escapes % as %%)
    for size, share in ((1024, "43%"), (512, "71%"), (256, "86%")):
        assert f"{round(100 * stage3[size].edge_window_padding)}%" == share and share + "%" in IMAGE_SIZE_HELP


def test_figures_match_hiera_itself(monkeypatch, one_torch_thread):
    """Record every window_partition call of a real Hiera tiny trunk, built from sam2's config as build_sam2 does."""
    from hydra import compose
    from hydra.utils import instantiate
    import sam2.modeling.backbones.hieradet as hieradet
    seen, original = [], hieradet.window_partition

    def recording(x, window_size):
        windows, (padded_h, padded_w) = original(x, window_size)
        seen.append((x.shape[1], window_size, padded_h - x.shape[1]))
        return windows, (padded_h, padded_w)

    monkeypatch.setattr(hieradet, "window_partition", recording)
    trunk = instantiate(compose(config_name=SAM2_MODELS["tiny"][0]).model.image_encoder.trunk).eval()
    for size in (128, 224, 256, 512):
        seen.clear()
        with torch.no_grad():
            trunk(torch.zeros(1, 3, size, size))
        assert seen == [(g.grid, g.window, g.padding) for g in windowed_grids("tiny", size) for _ in g.blocks], size


def test_warning_only_for_padding_beyond_the_trained_size():
    for size in (128, 224, 448, 896, 1024):
        assert padding_warning("tiny", size) is None, size
    for size, share in ((256, "86%"), (512, "71%"), (64, "71%"), (320, "57%")):
        warning = padding_warning("tiny", size)
        assert warning and "\n" not in warning and str(size) in warning and share in warning
        assert "43% at 1024" in warning and "multiples of 224" in warning
    for size in (224, 256, 448, 512, 1024):
        assert padding_warning("large", size) is None, size
    assert "50%" in padding_warning("large", 896) and "multiples of 256" in padding_warning("large", 896)
