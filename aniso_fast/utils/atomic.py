"""Atomic file writes: a temporary file in the same folder, fsynced, then moved into place in one step.

A crash at any moment leaves either the old file or the complete new one, never a half-written file, and no
temporary file behind (it is removed on any error; a killed process may leave one, named `.NAME.XXXXXXXX.tmp`).
`replace=False` creates the file exclusively: the temporary file is hard-linked to the name, which fails if the
name exists, so an existing or concurrently written file is never replaced; `replace=True` renames over it, so
that of concurrent writers the last complete file wins, never a mix. `atomic_folder` does the same for a folder
of files (a temporary folder beside it, renamed into place).

`fault_hook`, when set, is called with (step, path) before every step that changes the folder: the crash tests
kill the process there.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_folder", "check_writable_folder",
           "check_writable_file", "folder_lock", "remove_file", "fault_hook"]

fault_hook: Callable[[str, Path], None] | None = None


def _fault(step: str, path: Path) -> None:
    if fault_hook is not None:
        fault_hook(step, path)


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
    try:  # os.access says yes to root everywhere, e.g. in /proc: a probe folder, removed at once, tells
        os.rmdir(tempfile.mkdtemp(prefix=".aniso_fast-probe-", dir=existing))
    except OSError as e:
        raise ValueError(f"cannot write to {folder} ({existing} does not accept new files: {e.strerror})") from None


def check_writable_file(path: str | os.PathLike) -> None:
    """ValueError unless `path` can be written as a file: not a folder, in a writable (or creatable) folder."""
    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder, expected a file path")
    check_writable_folder(Path(path).parent)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on a folder (flock on the folder itself: no lock file), for read-modify-write
    updates of the files in it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_file(path: str | os.PathLike) -> None:
    """Delete a file if it is there (a fault point like every write)."""
    _fault("remove", Path(path))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


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


def _commit(path: Path, fill: Callable[[int, str], None], replace: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _fault("write", path)
    fd, tmp = _create_temp(path)
    try:
        fill(fd, tmp)
        _fault("commit", path)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # no-replace: fails if `path` exists, whoever created it
            except FileExistsError:
                raise FileExistsError(f"{path} exists (written by another process meanwhile); not replaced") \
                    from None
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, replace: bool = True) -> Path:
    def fill(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return _commit(Path(path), fill, replace)


def atomic_write_text(path: str | os.PathLike, text: str, *, replace: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode(), replace=replace)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, replace: bool = True) -> Path:
    """Let `write(tmp_path)` produce the file (e.g. PIL, numpy, safetensors), then move it into place."""
    def fill(fd: int, tmp: str) -> None:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    return _commit(Path(path), fill, replace)


def atomic_folder(path: str | os.PathLike, fill: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Let `fill(tmp_folder)` write a folder of files, then move the whole folder into place, so a reader never
    sees it half-written. `replace=False`: an existing folder with files in it is never replaced (FileExistsError);
    `replace=True`: it is swapped out and then deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not replace and path.exists():
        raise FileExistsError(f"{path} exists")
    _fault("write", path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    old = None
    try:
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        _fault("commit", path)
        if replace and path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.rename(tmp, path)  # replaces nothing but an empty folder: a folder with files raises
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST) or path.is_file():
                raise FileExistsError(f"{path} exists (written by another process meanwhile); not replaced") \
                    from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old / path.name, path)  # put the previous folder back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
