"""Expected failures: the CLI prints them as one line (no traceback) and exits with their `exit_code`.

    MaskgenError      base; never raised directly
    ├─ UserError      a mistake in what the user asked for (bad config, missing or corrupt file, unsafe
    │  └─ ConfigError checkpoint, bad flag value): exit 2
    └─ RunError       the work could not finish through no fault of the request (disk full, read-only
                      folder, a run directory in use, training diverged): exit 1

`os_error_message(e, doing)` turns an OSError (ENOSPC, EACCES, EROFS, ...) into one line naming the file.
"""
from __future__ import annotations

import errno
import os


class MaskgenError(Exception):
    exit_code = 1


class UserError(MaskgenError):
    """A mistake in what the user asked for (bad config, missing file, unsafe checkpoint...)."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration key, type or value."""


class RunError(MaskgenError):
    """The environment or the run stopped the work (no space left, no permission, diverged training...)."""

    exit_code = 1


_HINTS = {
    errno.ENOSPC: "no space left on device: free some space (or choose another output folder) and run again",
    errno.EDQUOT: "disk quota exceeded: free some space (or choose another output folder) and run again",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "operation not permitted: choose a folder you can write to",
    errno.EROFS: "read-only file system: choose a writable output folder",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
}


def os_error_message(e: OSError, doing: str = "") -> str:
    """One line: what failed, where, and what to do about it."""
    where = e.filename if e.filename is not None else ""
    if getattr(e, "filename2", None):
        where = f"{where} -> {e.filename2}"
    reason = _HINTS.get(e.errno) or (os.strerror(e.errno) if e.errno else str(e))
    parts = [p for p in (doing, str(where)) if p]
    return f"{' '.join(parts)}: {reason}" if parts else reason


_DISK_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122",
                    "unexpected pos", "file write failed")  # the last two: torch.save when a write comes up short


def is_disk_full(e: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, and for the errors that libraries raise in their place (torch.save's
    RuntimeError, safetensors' SafetensorError)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(w in str(e) for w in _DISK_FULL_WORDS)


def disk_full_message(e: BaseException, doing: str = "") -> str:
    """One line for a disk-full error of any type."""
    if isinstance(e, OSError):
        return os_error_message(e, doing)
    detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return f"{doing + ': ' if doing else ''}{_HINTS[errno.ENOSPC]} ({detail})"
