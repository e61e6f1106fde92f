"""Atomic file writes: a temporary file in the same folder, fsynced, then one `os.replace`.

A crash at any moment leaves either the old file or the complete new one, never a half-written file, and no
temporary file behind (it is removed on any error).
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "check_writable_folder", "check_writable_file"]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable_folder(folder: str | os.PathLike) -> None:
    """ValueError unless `folder` is, or can be made as, a writable folder; creates nothing (a CLI checks its
    output folder before any work, and the writes create it)."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a folder" if not existing.is_dir() else "is not writable"
        raise ValueError(f"cannot write to {folder} ({existing} {what})")


def check_writable_file(path: str | os.PathLike) -> None:
    """ValueError unless `path` can be written as a file: not a folder, in a writable (or creatable) folder."""
    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder, expected a file path")
    check_writable_folder(Path(path).parent)


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temporary file beside `path`, opened exclusively with mode 0o666: the umask (or a default ACL) then
    gives it the mode of any new file, where mkstemp's 0o600 would leave outputs unreadable to others."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: no free temporary file name beside it")


def _commit(path: Path, fill: Callable[[int, str], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        fill(fd, tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def fill(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return _commit(Path(path), fill)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Let `write(tmp_path)` produce the file (e.g. PIL, numpy, safetensors), then move it into place."""
    def fill(fd: int, tmp: str) -> None:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    return _commit(Path(path), fill)
