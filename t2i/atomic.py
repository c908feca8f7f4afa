"""Folders and files written whole: a reader finds the previous version or the new one, never a mix or nothing.

A folder is written under a temporary name beside its target, then swapped in. On Linux the swap is one
`renameat2(RENAME_EXCHANGE)` call, which Python does not expose (hence the thin ctypes wrapper), so the
target path always holds a complete folder. Elsewhere the old folder is moved aside first, which leaves a
moment without one. The staging and set-aside folders have hidden names of t2i's own, so that clearing a stale one
never touches a user's `NAME.tmp`.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from t2i.errors import T2IError, first_few

STAGING_SUFFIX = ".tmp"  # of staged files
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _libc_renameat2():
    if sys.platform != "linux":
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_renameat2 = _libc_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def replace_folder(staging: Path, target: Path) -> None:
    """Move the complete folder `staging` to `target`, replacing any folder there."""
    if not target.exists():
        staging.rename(target)
        return
    if exchange(staging, target):
        shutil.rmtree(staging)  # now the old folder
        return
    aside = _beside(target, "t2i-old")
    shutil.rmtree(aside, ignore_errors=True)
    target.rename(aside)
    staging.rename(target)
    shutil.rmtree(aside)


def check_replaceable(target: Path, markers: tuple[str, ...], what: str) -> None:
    """Refuse a folder `target` holding other things than a previous `what` (recognised by any of the `markers`
    files), which `write_folder` would replace whole; `write_folder` itself refuses a file."""
    if not target.is_dir() or any((target / marker).is_file() for marker in markers):
        return
    held = sorted(path.name for path in target.iterdir())
    if held:
        raise T2IError(f"'{target}' already holds other files ({first_few(held)}), and writing {what} there would replace "
                       "the whole folder: give a new or empty folder")


def give_default_modes(path: Path) -> None:
    """Give the file at `path`, or every file under it, the mode a plain `open()` gives under this process's umask:
    safetensors writes its files 0600 whatever the umask, so weights in a shared folder were unreadable to others."""
    mode = 0o666 & ~_umask()
    files = [path] if path.is_file() else [file for file in path.rglob("*") if file.is_file()]
    for file in files:
        if not file.is_symlink():
            os.chmod(file, mode)


def _umask() -> int:
    """This process's umask, read without setting it where Linux shows it (setting it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _beside(target: Path, role: str) -> Path:
    return target.with_name(f".{target.name}.{role}")


@contextmanager
def write_folder(target: Path, what: str) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without error, it replaces `target` whole.

    A failed write (disk full, no permission) removes the staging folder, leaves `target` as it was and
    becomes one T2IError line naming `what` was being written.
    """
    if target.exists() and not target.is_dir():
        raise T2IError(f"could not write {what} '{target}': it is a file, and {what} is a folder; give a path that "
                       "is a folder or does not exist yet")
    staging = _beside(target, "t2i-staging")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        yield staging
        give_default_modes(staging)
        replace_folder(staging, target)
    except (OSError, SafetensorError) as error:  # safetensors reports its write errors as its own type
        shutil.rmtree(staging, ignore_errors=True)
        kept = "the previous one is intact" if target.exists() else "nothing was written there"
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise T2IError(f"could not write {what} '{target}': {reason}; {kept}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def write_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; what the block writes there replaces `target` in one rename."""
    draft = target.with_name(f"{target.name}.{os.getpid()}{STAGING_SUFFIX}")
    try:
        yield draft
        give_default_modes(draft)
        os.replace(draft, target)
    finally:
        draft.unlink(missing_ok=True)
