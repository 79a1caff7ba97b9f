"""Outputs checked before the work and written atomically, so that nothing is computed for an hour and then lost.

    prepare_dir(path, what)         the folder exists (created) and can be written to, or one-line error
    prepare_file(path, what)        the same for a file's folder; the path is not a folder
    check_free_space(path, n, what) at least n bytes free on path's file system, or RunError
    atomic_write(path)              context manager yielding a temporary path next to `path`; renamed onto
                                    `path` when the block succeeds, removed when it fails

A path that cannot be an output (a file where a folder is needed, or the reverse) is a UserError (exit 2); a
file system that refuses (read-only, no permission, full) is a RunError (exit 1).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import RunError, UserError, os_error_message


def prepare_dir(path: str | os.PathLike, what: str = "output folder", create: bool = True) -> Path:
    """Create `path` (and its parents) and check that a file can be written in it. `create=False` creates
    nothing: it checks that the nearest existing folder on the way is writable."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{what} {path}: {blocker} is a file, not a folder")
    if not create:
        existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
        if not os.access(existing, os.W_OK):
            raise RunError(f"cannot write to {what} {path}: {existing} is read-only or not writable")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".maskgen-write-test-"):
            pass
    except OSError as e:
        raise RunError(os_error_message(e, f"cannot write to {what} {path}:")) from None
    return path


def prepare_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Check that `path` can be written (its folder is created); it may exist as a file, not as a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    prepare_dir(path.parent if str(path.parent) else Path("."), f"the folder of {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise RunError(f"cannot write {what} {path}: permission denied")
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system of `path` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """RunError when fewer than `needed` bytes are free where `path` lives."""
    free = free_bytes(path)
    if free < needed:
        raise RunError(f"not enough disk space for {what} in {path}: about {_mb(needed)} needed, {_mb(free)} free; "
                       f"free some space or choose another folder")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_write(out) as tmp: write(tmp)`: `out` appears complete or not at all; the temporary file is
    removed when writing fails (a full disk leaves nothing behind)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
