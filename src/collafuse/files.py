"""Writing files so that a reader sees the old content or the new one, never half of it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, suffix: str = ".tmp", durable: bool = False) -> None:
    """Write ``data`` to a temp file beside ``path`` (``.<name>.<random><suffix>``), fsync it
    and rename it over ``path``; the temp file is removed on any failure.

    ``durable`` also fsyncs the folder, so the rename itself survives a power loss (the store
    does; run outputs do not need it). Creates ``path``'s folder. Raises what the OS raises.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable by syncing its folder (best effort where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
