"""Small file helpers shared by the whole package: hashing, atomic writes, weight fingerprints,
a process's CPU time.

Core module: it imports nothing else of the package, so the pipeline, the hand tracker, the
networks and training can all use it without depending on each other.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "cpu_seconds", "sha256", "weights_fingerprint"]


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Have ``write`` fill a temporary file beside ``path``, fsync it, then ``os.replace`` it
    into place (and fsync the folder): readers see the old file or the whole new one, never a
    part, even if the process dies mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def weights_fingerprint(nets: dict[str, Any]) -> str:
    """SHA-256 of networks' weights (names, dtypes, shapes and values of every state entry), so
    caches of what they computed (exported graphs, evaluation scores) can tell them apart."""
    import torch

    h = hashlib.sha256()
    for name in sorted(nets):
        for key, value in sorted(nets[name].state_dict().items()):
            t = value.detach().to("cpu").contiguous()
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU seconds of this process, or of process ``pid`` (Linux ``/proc``;
    ``None`` where it cannot be read)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
