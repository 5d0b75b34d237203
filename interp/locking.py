"""One writer per directory: an advisory ``flock`` on a lock file that names its holder.

The kernel drops a ``flock`` when its process exits, however it exits (``kill -9`` included), so
a lock left by a crashed run is stale by construction: the next run takes it over. The file only
tells a second run who holds the lock (pid, host, start time, what it is doing).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class LockedError(RuntimeError):
    """The directory is held by another live process."""


def user_mode(mode: int = 0o777) -> int:
    """``mode`` less the process umask (what ``mkdir`` would give)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('doing', 'running')} since {info.get('since')})"


@contextmanager
def directory_lock(directory: str | os.PathLike, doing: str, *, wait: bool = False, name: str = LOCK_NAME):
    """Hold ``<directory>/<name>`` for the ``with`` block; raise ``LockedError`` naming the holder,
    or with ``wait=True`` tell stderr who holds it and wait for it to be released."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                raise LockedError(
                    f"{directory} is in use by {_holder(path)}; wait for that run to finish, or give "
                    "another output directory"
                ) from None
            print(f"waiting for {_holder(path)}, which holds {directory}", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the holder before us may have removed the file: then ours is a lock on nothing
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "doing": doing,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield path
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)
