"""Stage-2 weights name the SAM 2 checkpoint file their frozen part came from, instead of holding a copy of it.

Once a network has loaded an official SAM 2.1 checkpoint, its state dict (and so every nnU-Net checkpoint of a
stage-2 fold) holds what trains (adapters, decoder heads, prompt gates: ~1.4 M parameters for tiny) and a
reference to that file: its SHA-256, its name, its model size and the path it was loaded from. SAM 2's frozen
weights are 150 MB (tiny) to 900 MB (large) per checkpoint file otherwise, in every fold and every zip.

Loading such weights loads SAM 2 from the same file again: from RFMEDSAM2_SAM2_CHECKPOINT when that names a file
with the same SHA-256 (another machine, another folder), else from the recorded path. A missing or different file
is refused with one line naming what was looked for. The reference is a fixed-size uint8 tensor in the state dict,
so nnU-Net's loaders, which compare keys and shapes, treat it as any other weight.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nnunetv2_rfmedsam.model.sam2_checkpoint import SAM2CheckpointError
from nnunetv2_rfmedsam.settings import OFFICIAL_CHECKPOINT_HINT, SAM2_CHECKPOINT_VARIABLE

REFERENCE_KEY = "sam2_checkpoint_reference"
_REFERENCE_BYTES = 4096


@dataclass(frozen=True)
class SAM2Reference:
    sha256: str
    name: str
    model_size: str
    path: str  # where the file was at training

    @classmethod
    def of_file(cls, path: str | os.PathLike, model_size: str) -> "SAM2Reference":
        path = Path(path).resolve()
        return cls(file_sha256(path), path.name, model_size, str(path))

    def to_tensor(self) -> torch.Tensor:
        encoded = json.dumps(asdict(self)).encode()
        if len(encoded) > _REFERENCE_BYTES:
            raise ValueError(f"SAM 2 checkpoint path too long to record ({len(encoded)} bytes): {self.path}")
        return torch.tensor(list(encoded.ljust(_REFERENCE_BYTES, b"\0")), dtype=torch.uint8)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> "SAM2Reference":
        return cls(**json.loads(bytes(tensor.cpu().tolist()).rstrip(b"\0")))

    def describe(self) -> str:
        return f"{self.name} (SAM 2.1 {self.model_size}, sha256 {self.sha256[:16]}..., at training {self.path})"


def file_sha256(path: str | os.PathLike) -> str:
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and time: a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def locate(reference: SAM2Reference, environ=os.environ) -> Path:
    """The file `reference` names: RFMEDSAM2_SAM2_CHECKPOINT if it has the same SHA-256, else the recorded path if
    it does; SAM2CheckpointError otherwise."""
    tried = []
    for origin, candidate in ((SAM2_CHECKPOINT_VARIABLE, environ.get(SAM2_CHECKPOINT_VARIABLE)),
                              ("the recorded path", reference.path)):
        if not candidate:
            tried.append(f"{origin} is not set")
        elif not os.path.isfile(candidate):
            tried.append(f"{origin} {candidate} does not exist")
        elif file_sha256(candidate) != reference.sha256:
            tried.append(f"{origin} {candidate} is another file (sha256 {file_sha256(candidate)[:16]}...)")
        else:
            return Path(candidate)
    raise SAM2CheckpointError(
        f"These stage-2 weights hold only what trained; SAM 2's frozen weights come from {reference.describe()}, "
        f"which was not found: {'; '.join(tried)}. Set {SAM2_CHECKPOINT_VARIABLE}=/path/to/{reference.name} (the "
        f"same file; {OFFICIAL_CHECKPOINT_HINT})")
