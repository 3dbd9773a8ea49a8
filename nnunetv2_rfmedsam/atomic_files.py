"""Outputs replace their files atomically: a reader, or a run killed halfway, sees the old file or the new one,
never half of one."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | os.PathLike):
    """Yield a temporary path in `path`'s folder, ending in `path`'s name (writers that pick the format from the
    ending keep working); when the block ends, it replaces `path` with os.replace. On an error, or a kill, `path`
    keeps what it had and the temporary file is removed (or, after a kill, left under a name nothing reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{os.getpid()}.tmp.{path.name}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    with replacing(path) as temporary, open(temporary, "wb") as file:
        file.write(data)
