"""Owning an output folder: the run lock, and removing a previous run's files on ``overwrite``.

A run that calls ``CheckpointManager.claim(resume=..., overwrite=...)`` owns its output folder: the
main process takes ``<output_dir>/.adatok-run.lock`` (:class:`OutputDirLock`: ``fcntl.flock`` plus
pid, host and start time), so a second run into the same folder is refused with
``OutputDirLockedError`` naming the holder. A fresh run into a folder that holds another run
refuses (``OutputDirNotEmptyError``) unless it resumes or overwrites; ``overwrite`` removes the
previous run's :data:`RUN_ENTRIES` through :func:`remove_run_entries`. Deciding whether a folder
holds a run (its checkpoints, its ``latest`` pointer) is the manager's business and stays in
``checkpointing``, which re-exports every public name here.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

from .integrity import CheckpointError

LOCK_FILE = ".adatok-run.lock"
# What a run writes into its output_dir; ``claim(overwrite=True)`` removes these of the previous run.
RUN_ENTRIES = ("checkpoints", "model", "adapter", "log.jsonl", "tensorboard", "samples")


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
class OutputDirLockedError(CheckpointError):
    """Another run holds the output folder; ``holder`` is its lock record (pid, host, started)."""

    def __init__(self, message: str, path: str | Path | None = None, holder: dict | None = None):
        super().__init__(message, path, check="locked")
        self.holder = holder or {}


class OutputDirNotEmptyError(CheckpointError, FileExistsError):
    """A fresh run (no resume) into a folder that holds another run, without ``overwrite``."""


# ---------------------------------------------------------------------------------------------
# processes and a previous run's files
# ---------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0 only asks; it sends nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_interrupted_overwrites(output_dir: Path) -> None:
    """Delete the hidden folders an overwrite interrupted earlier left in ``output_dir``."""
    for leftover in Path(output_dir).glob(".overwritten-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def remove_run_entries(output_dir: Path, entries: tuple[str, ...], tag: str) -> list[str]:
    """Remove a previous run's ``entries`` from ``output_dir``; returns the names that were there.

    They are moved into one hidden folder ``.overwritten-<pid>-<tag>`` first, then that is deleted,
    so a crash never leaves two runs mixed (``clear_interrupted_overwrites`` removes the leftover).
    """
    output_dir = Path(output_dir)
    trash = output_dir / f".overwritten-{os.getpid()}-{tag}"
    trash.mkdir()
    moved = []
    for name in entries:
        source = output_dir / name
        if source.exists() or source.is_symlink():
            os.replace(source, trash / name)
            moved.append(name)
    shutil.rmtree(trash)
    return moved


# ---------------------------------------------------------------------------------------------
# the output-folder lock
# ---------------------------------------------------------------------------------------------
class OutputDirLock:
    """An exclusive claim on an output folder: ``<output_dir>/.adatok-run.lock``.

    The file is ``fcntl.flock``-ed for as long as the run holds it (the kernel drops the lock when the
    process dies, even by ``kill -9``) and holds the holder's pid, host and start time, so a second run
    is told who has the folder. A lock file left by a process that died is stale: on the same host the
    free ``flock`` proves it (the warning says whether the pid still runs), and it is taken over with a
    warning; one left by another host is refused, naming it, since this machine cannot tell whether
    that run still goes (delete the file if it does not). ``release`` removes the file; both calls are
    idempotent; the lock is also a context manager.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    @staticmethod
    def _record(fd: int) -> dict | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        if not raw.strip():
            return None
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"unreadable": raw[:60].decode("utf-8", "replace")}
        return record if isinstance(record, dict) else {"unreadable": str(record)[:60]}

    @staticmethod
    def describe(record: dict | None) -> str:
        if not record or "unreadable" in record:
            return "an unknown process (the lock file is unreadable)"
        return f"pid {record.get('pid')} on host {record.get('host')} (started {record.get('started')})"

    def acquire(self) -> "OutputDirLock":
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                record = self._record(fd)
                os.close(fd)
                raise OutputDirLockedError(
                    f"the output folder {self.path.parent} is in use by another run: {self.describe(record)} holds "
                    f"{self.path}. Wait for it to finish or stop it, or choose another output_dir", self.path,
                    record) from None
            try:   # the holder may have released (removed the file) between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                previous = self._record(fd)
                if previous and previous.get("host", host) != host:
                    raise OutputDirLockedError(
                        f"the output folder {self.path.parent} was taken by {self.describe(previous)}, another "
                        f"machine, and never released; this machine cannot tell whether that run still goes. If it "
                        f"does not, delete {self.path}", self.path, previous)
                if previous:
                    pid = previous.get("pid")
                    why = ("it no longer runs" if not isinstance(pid, int) or not _pid_alive(pid)
                           else "the pid runs but no longer holds the lock (reused?)")
                    warnings.warn(f"taking over the stale lock {self.path} of {self.describe(previous)}: {why}",
                                  stacklevel=3)
                record = {"pid": os.getpid(), "host": host,
                          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise OutputDirLockedError(f"could not take the lock {self.path}: it kept being replaced by other runs",
                                   self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)   # drops the flock

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
