"""One training run per output folder: OUT/.lock, held by the process that writes OUT (rank 0 under
torchrun) for the whole run.

A second run started on the same --out would interleave checkpoints and `latest` with the first and
leave neither resumable; it is refused with one line. The lock is a file created with O_EXCL (atomic on
POSIX file systems, NFS included since v3) holding the owner's host and pid. A lock left by a process
that died without cleaning up (SIGKILL, power loss) is stale when its host is this one and its pid is
gone: it is taken over. A lock from another host cannot be checked and is refused, naming the file to
delete once that run is known to be over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from ldmkit.errors import LdmkitError
from ldmkit.imageio import make_dir

LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _acquire(path: Path) -> None:
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):  # the second try follows the removal of a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
                host, pid = owner["host"], int(owner["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                host, pid = None, None  # unreadable: written by a process killed mid-write
            if host == me["host"] and pid is not None and _alive(pid):
                raise LdmkitError(f"{path.parent} is in use by another ldmkit run (pid {pid}); wait for it to "
                                  "finish or choose another --out") from None
            if host not in (None, me["host"]):
                raise LdmkitError(f"{path.parent} is locked by a run on host {host} (pid {pid}); if that run is "
                                  f"over, delete {path} and start again") from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise LdmkitError(f"could not take the lock {path}; another run is starting on the same --out")


@contextlib.contextmanager
def run_lock(out: Path, held: bool = True):
    """Hold OUT/.lock for the block (`held=False`: a process that does not write OUT, e.g. rank > 0)."""
    if not held:
        yield
        return
    path = make_dir(out) / LOCK
    _acquire(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
