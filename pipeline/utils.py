"""Small helpers with no model or tensor knowledge, shared by both stages."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import socket
import tempfile
from pathlib import Path

from .faults import fault_point

log = logging.getLogger(__name__)


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk_size`` byte chunks (constant memory).

    Raises:
        FileNotFoundError / OSError: as ``open``.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fault: str | None = None) -> Path:
    """Write ``data`` to ``path`` so that a reader (or a resumed job) never sees half a file.

    The bytes go to a temp file in the same directory, are flushed and fsynced, then
    ``os.replace`` puts the file in place; on any error the temp file is removed and an existing
    ``path`` is left as it was. Temp files of ``path`` left by a killed writer are removed after
    the next successful write.

    Args:
        path: destination file (its directory is created).
        data: the complete file content.
        fault: a :mod:`pipeline.faults` point reached after the temp file is written, before the rename.

    Raises:
        OSError: the directory or file cannot be written (disk full, permissions); ``filename`` is ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if fault is not None:
            fault_point(fault, path)
        os.replace(tmp, path)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
            with contextlib.suppress(OSError):
                stale.unlink()
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename != str(path):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    return path


class LockError(RuntimeError):
    """Another live process holds the lock of the store or run directory this one would write."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WriterLock:
    """An exclusive lock file held while one job writes a store or run directory.

    The lock is the file ``path`` created with ``O_EXCL``, holding JSON
    ``{"pid", "host", "started", "command"}``. A second job finds it and is refused with the
    owner named. A lock left by a dead process on this host (a killed job) is taken over with a
    warning; a lock from another host cannot be checked and is never taken over.

    Use as a context manager; :meth:`release` removes the file only if this process owns it.

    Args:
        path: the lock file, e.g. ``<out>.lock`` next to a store.
        command: what the owner is doing (shown to the refused job).

    Raises (on enter):
        LockError: a live process (or a process on another host) holds the lock; the message
            names its pid, host, start time and the lock file to delete if it is known to be gone.
    """

    def __init__(self, path: str | os.PathLike, command: str):
        self.path = Path(path)
        self.command = command
        self.owned = False

    def _info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def acquire(self) -> "WriterLock":
        """Take the lock (see the class docstring for what happens when it is held)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self._info()).encode()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(self.path.read_text())
                pid, host = int(owner["pid"]), str(owner["host"])
            except (OSError, ValueError, KeyError, TypeError):
                raise LockError(f"{self.path}: lock file exists but cannot be read; if no other job writes here, "
                                "delete it and re-run") from None
            if host != socket.gethostname() or _pid_alive(pid):
                raise LockError(
                    f"{self.path}: held by pid {pid} on {host} ({owner.get('command', '?')}, started "
                    f"{owner.get('started', '?')}); two writers would corrupt it. Wait for that job to end, "
                    f"or delete {self.path} if it is known to be gone") from None
            log.warning(
                "%s: taking over a stale lock of pid %d on %s (started %s), which is no longer running",
                self.path, pid, host, owner.get("started", "?"))
            write_bytes_atomic(self.path, data)
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        self.owned = True
        return self

    def release(self) -> None:
        """Remove the lock file if this process owns it."""
        if not self.owned:
            return
        self.owned = False
        with contextlib.suppress(OSError, ValueError):
            if int(json.loads(self.path.read_text())["pid"]) == os.getpid():
                self.path.unlink()

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
