"""Files only the site's own user may read: its state folder (0700) and files in it (0600).

A site's state folder holds preprocessed patient volumes, the privacy ledger, the
outbound audit log and error tracebacks. Every writer goes through these three
functions, so no file is ever created readable by others, not even briefly. Free of
torch and Flower (the ClientApp module uses them).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) readable by its user only; tighten it if it is looser.

    With the folder 0700 no other user can read any file in it, whatever its own mode.
    A folder this user does not own (e.g. a mount) is left as it is, with a warning.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        try:
            path.chmod(0o700)
        except PermissionError:
            logger.warning(
                "state folder %s is readable by other users and cannot be made private "
                "(not its owner): restrict it to the site's service user",
                path,
            )


def append_private(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` (created 0600, ``O_APPEND``), flushed to disk."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically (a 0600 temp file, fsync, rename); no stray temp file."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
