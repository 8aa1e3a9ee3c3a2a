"""The base of mtd's own errors, and how the command-line entry points report them.

Every message names the problem and how to fix it. Entry points (train.py, eval.py,
`python -m mtd.export`) run their body through `cli_main`, which prints such messages without a
traceback and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

# Exit code of a run stopped by bad input (argparse uses the same for bad arguments).
USAGE_EXIT = 2


class MtdError(Exception):
    """A problem with the user's input, data or environment, explained in the message."""


# OS errors that are the environment's fault, not a bug: each with what the user can do about it.
_OS_FIXES = {
    errno.EACCES: "it is not writable (or readable) by this user: fix its permissions or choose "
                  "another folder",
    errno.EROFS: "it is on a read-only file system: choose a writable folder",
    errno.ENOSPC: "the disk is full: free space and run again (train.py: with --resume); finished "
                  "work is kept",
    errno.EDQUOT: "the disk quota is exceeded: free space and run again (train.py: with --resume)",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter name",
}


def explain_os_error(err: OSError) -> str | None:
    """A one-line message for an environment OSError (read-only, full disk...), else None."""
    fix = _OS_FIXES.get(err.errno)
    if fix is None:
        return None
    where = f" {err.filename}" if err.filename else ""
    return f"Cannot write{where} ({err.strerror or err}): {fix}."


def cli_main(name: str, body: Callable[[], int | None]) -> int:
    """Run an entry point's body; bad input and environment errors become one line and exit 2."""
    log = logging.getLogger(name)
    try:
        return body() or 0
    except MtdError as e:
        log.error("%s", e)
        return USAGE_EXIT
    except OSError as e:
        message = explain_os_error(e)
        if message is None:
            raise
        log.error("%s", message)
        return USAGE_EXIT
