"""One run per folder: a lock file naming its holder (host, pid, start time, command).

The lock is created complete and in one step (written beside, then hard-linked into place, which fails if a
lock exists), so a reader never sees half a lock. A lock whose process is gone (same host, and the pid is dead,
a zombie, or now another process) is taken over with a line saying so; any other lock refuses the run. Locks
are re-entrant within a process: `t2i demo` holds its folder while the training inside it takes it again.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from t2i.errors import T2IError

LOCK_NAME = "t2i.lock"
_held: dict[Path, int] = {}  # lock paths this process holds -> nesting depth


class RunFolderBusy(T2IError):
    """Another live run holds the folder."""


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    started: str
    command: str
    # The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder.
    process_start: int | None = None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started} ({self.command})"


def _process_start(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 of proc(5), counted after the command name


def _alive(holder: LockHolder) -> bool:
    """Is the holder still running? Only answerable on its own host; elsewhere assume it is."""
    if holder.host != socket.gethostname():
        return True
    if not Path("/proc/self/stat").exists():  # no procfs: ask the kernel whether the pid exists
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        state = Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if state in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    return holder.process_start is None or _process_start(holder.pid) == holder.process_start


def _me() -> LockHolder:
    return LockHolder(host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                      command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
                      process_start=_process_start(os.getpid()))


def read_holder(lock: Path) -> LockHolder | None:
    """The holder a lock file names; None if it is unreadable (a damaged lock names no one)."""
    try:
        return LockHolder(**json.loads(lock.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _try_create(lock: Path, me: LockHolder) -> bool:
    draft = lock.with_name(f"{lock.name}.{me.pid}.draft")
    draft.write_text(json.dumps(asdict(me)))
    try:
        os.link(draft, lock)
        return True
    except FileExistsError:
        return False
    finally:
        draft.unlink()


def _take_over(lock: Path, stale: LockHolder | None) -> bool:
    """Remove a stale lock, unless another process replaced it in the meantime."""
    aside = lock.with_name(f"{lock.name}.{os.getpid()}.stale")
    try:
        lock.rename(aside)
    except FileNotFoundError:
        return False
    if read_holder(aside) != stale:  # someone took it over first: put theirs back
        try:
            os.link(aside, lock)
        except FileExistsError:
            pass
        aside.unlink()
        return False
    aside.unlink()
    who = stale.describe() if stale else "an unreadable lock"
    print(f"t2i: taking over '{lock}' from {who}, which is no longer running", file=sys.stderr)
    return True


def acquire(run_dir: Path, what: str = "run folder") -> Path:
    """Take the lock of `run_dir` (creating the folder) or raise RunFolderBusy naming the holder; `what` names the
    folder's kind in the messages ("run folder", "output folder")."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise T2IError(f"cannot create {what} '{run_dir}': {error.strerror or error}") from None
    lock = (run_dir / LOCK_NAME).resolve()
    if lock in _held:
        _held[lock] += 1
        return lock
    me = _me()
    for _ in range(5):
        try:
            created = _try_create(lock, me)
        except OSError as error:  # a read-only folder or file system, a full disk
            raise T2IError(f"cannot write the lock '{lock}' in {what} '{run_dir}': {error.strerror or error}; give a "
                           "folder this user can write to") from None
        if created:
            _held[lock] = 1
            return lock
        holder = read_holder(lock)
        if holder is not None and _alive(holder):
            raise RunFolderBusy(f"{what} '{run_dir}' is in use by {holder.describe()}; wait for that run to "
                                f"end or stop it. If it is gone, delete '{lock}'")
        _take_over(lock, holder)
    raise RunFolderBusy(f"could not lock {what} '{run_dir}': other processes keep taking it")


def release(lock: Path) -> None:
    _held[lock] -= 1
    if _held[lock]:
        return
    del _held[lock]
    holder = read_holder(lock)
    if holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextmanager
def hold(run_dir: Path, what: str = "run folder") -> Iterator[Path]:
    lock = acquire(run_dir, what)
    try:
        yield lock
    finally:
        release(lock)


@contextmanager
def hold_for_group(folder: Path, what: str, is_main: bool, num_processes: int) -> Iterator[None]:
    """The lock of `folder` for a group of processes (`accelerate launch`, torchrun): the main one holds it for all,
    and if it cannot, every process stops with its reason, sent to all so that none waits on a main process that
    has given up. Every process must enter this together."""
    lock, refusal = None, None
    if is_main:
        try:
            lock = acquire(folder, what)
        except T2IError as error:  # busy, or the folder cannot be created or written
            refusal = (isinstance(error, RunFolderBusy), str(error))
    if num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        busy, message = refusal
        raise (RunFolderBusy if busy else T2IError)(message)
    try:
        yield
    finally:
        if lock is not None:
            release(lock)

