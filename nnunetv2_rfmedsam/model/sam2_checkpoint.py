"""Official SAM 2.1 checkpoints (`{"model": state_dict}`): checked completely, then loaded into SAM 2.

A checkpoint that does not fit is refused with one line naming the file, what is wrong, the expected model
size and where the official files come from; nothing is loaded in that case. The model may already carry
adapters: their parameters are not in official files and keep their values.
"""
from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path

import torch
from hydra import compose
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.sam2_base import SAM2Base

from nnunetv2_rfmedsam.model.adapters import adapter_parameter_names
from nnunetv2_rfmedsam.model.sam2_model import build_sam2_model
from nnunetv2_rfmedsam.settings import OFFICIAL_CHECKPOINT_HINT, SAM2_MODELS, validate_model_size

PATCH_EMBED_KEY = "image_encoder.trunk.patch_embed.proj.weight"
_HIERA_BLOCK_KEY = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")
# keys only SAM 1 (segment-anything) state dicts have; SAM 2 names its heads sam_prompt_encoder/sam_mask_decoder
_SAM1_KEY_PREFIXES = ("image_encoder.blocks.", "image_encoder.patch_embed.", "prompt_encoder.", "mask_decoder.")
_LISTED = 3  # how many offending keys a message names


class SAM2CheckpointError(RuntimeError):
    """A SAM 2 checkpoint that cannot be used; the message is one line and names the file."""


def load_sam2_checkpoint(sam_model: SAM2Base, path: str | Path, model_size: str) -> None:
    """Load an official SAM 2.1 checkpoint of `model_size` into `sam_model`, or raise SAM2CheckpointError."""
    validate_model_size(model_size)
    state_dict = _read_state_dict(Path(path), model_size)
    _check_fits(sam_model, state_dict, Path(path), model_size)
    sam_model.load_state_dict(state_dict, strict=False)


def save_official_format_checkpoint(path: str | Path, model_size: str, seed: int = 0) -> Path:
    """Write a randomly initialised SAM 2.1 model of `model_size` in the official checkpoint format
    (for tests and demos, where the official files cannot be downloaded)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        # parameter shapes do not depend on the input size: the smallest one builds the same tensors
        model = build_sam2_model(model_size, image_size=32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def hiera_signature(state_dict: dict) -> tuple[int, int] | None:
    """(width of the first Hiera stage, number of Hiera blocks): these tell the four SAM 2 sizes apart."""
    if PATCH_EMBED_KEY not in state_dict:
        return None
    blocks = {int(m.group(1)) for key in state_dict if (m := _HIERA_BLOCK_KEY.match(key))}
    return int(state_dict[PATCH_EMBED_KEY].shape[0]), len(blocks)


@functools.cache
def model_size_signatures() -> dict[str, tuple[int, int]]:
    """`hiera_signature` of each model size, read off sam2's packaged configs."""
    default_stages = inspect.signature(Hiera).parameters["stages"].default
    signatures = {}
    for size, (config, _) in SAM2_MODELS.items():
        trunk = compose(config_name=config).model.image_encoder.trunk
        signatures[size] = (int(trunk.embed_dim), int(sum(trunk.get("stages", default_stages))))
    return signatures


def _refuse(path: Path, problem: str, model_size: str) -> SAM2CheckpointError:
    message = (f"SAM 2 checkpoint {path}: {problem}. Expected the official SAM 2.1 {model_size} checkpoint "
               f"({SAM2_MODELS[model_size][1]}). {OFFICIAL_CHECKPOINT_HINT}")
    return SAM2CheckpointError(" ".join(message.split()))


def _listed(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LISTED])
    return shown + (f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")


def _read_state_dict(path: Path, model_size: str) -> dict:
    if not path.is_file():
        raise _refuse(path, "the file does not exist", model_size)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for unreadable files; all mean the same here
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise _refuse(path, f"torch.load cannot read it ({type(error).__name__}: {first_line})",
                      model_size) from error
    state_dict = content.get("model") if isinstance(content, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        found = f"a dict with keys {_listed(map(str, content))}" if isinstance(content, dict) \
            else f"a {type(content).__name__}"
        raise _refuse(path, f"not in the official format (a dict whose 'model' entry is a state dict); "
                            f"found {found}", model_size)
    if not any(key.startswith("memory_attention.") for key in state_dict) and \
            any(key.startswith(_SAM1_KEY_PREFIXES) for key in state_dict):
        raise _refuse(path, "this is a SAM 1 checkpoint (segment-anything keys such as image_encoder.blocks "
                            "and mask_decoder, no memory attention); RFMedSAM 2 needs SAM 2.1", model_size)
    return state_dict


def _check_fits(sam_model: SAM2Base, state_dict: dict, path: Path, model_size: str) -> None:
    own = sam_model.state_dict()
    adapter_keys = adapter_parameter_names(sam_model)
    expected = {key: value for key, value in own.items() if key not in adapter_keys}

    found_signature = hiera_signature(state_dict)
    expected_signature = hiera_signature(expected)
    if found_signature is not None and found_signature != expected_signature:
        looks_like = [size for size, sig in model_size_signatures().items() if sig == found_signature]
        kind = f"a SAM 2 {looks_like[0]} checkpoint" if looks_like else "a SAM 2 model of an unknown size"
        raise _refuse(path, f"it looks like {kind} (Hiera width {found_signature[0]}, {found_signature[1]} "
                            f"blocks), not {model_size} (width {expected_signature[0]}, "
                            f"{expected_signature[1]} blocks)", model_size)

    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    if missing or unexpected:
        parts = [f"{len(keys)} {what} key(s) ({_listed(keys)})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise _refuse(path, f"its keys do not match SAM 2.1 {model_size}: {'; '.join(parts)}", model_size)

    wrong_shape = {key for key, value in state_dict.items() if value.shape != expected[key].shape}
    if wrong_shape:
        shown = ", ".join(f"{key} {tuple(state_dict[key].shape)} instead of {tuple(expected[key].shape)}"
                          for key in sorted(wrong_shape)[:_LISTED])
        raise _refuse(path, f"{len(wrong_shape)} tensor(s) have the wrong shape for SAM 2.1 {model_size}: "
                            f"{shown}", model_size)
