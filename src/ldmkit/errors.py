"""User-facing errors.

Anything raised as `LdmkitError` is a problem with the user's input (a file, a config, a
checkpoint), not a bug: the CLI prints its message as one line on stderr and exits non-zero.
Messages say what is wrong and what to do about it.
"""

import os


class LdmkitError(Exception):
    """A problem the user can fix; printed as one line by the CLI."""


class TrainingInterrupted(LdmkitError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint (exit code 130)."""


# errno values that mean "the disk (or quota) is full": the user frees space, nothing is wrong with ldmkit
DISK_FULL_ERRNOS = frozenset({28, 122, 27})  # ENOSPC, EDQUOT, EFBIG (a per-file size limit)


def disk_full(e: BaseException, folder=None) -> bool:
    """Whether `e` is a full disk. Writers that wrap the OS error lose its errno (safetensors raises
    SafetensorError "... os error 28", torch.save a RuntimeError from its zip writer), so their
    message is read too, and when `folder` is given, less than 1 MiB free there counts as full."""
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
        return True
    if "No space left on device" in str(e) or "os error 28" in str(e):
        return True
    if folder is not None:
        try:
            st = os.statvfs(folder)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 1 << 20
    return False
