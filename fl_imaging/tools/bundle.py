"""The app folder ``flwr run`` bundles, without the folders Flower would leave out anyway.

``flwr run <folder>`` (Flower 1.42, ``flwr.cli.utils.collect_files``) walks every file
under the folder and only then applies its include/exclude patterns and the
``.gitignore``. A project with its virtual environment inside has about 45,000 files
there: 2.5-4.5 s of every ``flwr run`` on this machine. :func:`stage_app` copies what
Flower would bundle to another folder, which ``flwr run`` then walks in milliseconds.
Light on purpose (no torch): the deployment script imports it too.

It also holds a hospital's side of pinned app versions: :func:`fab_bytes` and
:func:`bundle_hash` give the hash ``fl-imaging site approve`` prints, and
:func:`check_approved` is what the hospital's executor runs on every bundle the
coordinator sends, before anything of it is installed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import pathspec

# folders Flower never bundles (flwr.supercore.constant.APP_PUBLISH_EXCLUDE_PATTERNS) plus
# version control metadata (no file in it matches Flower's include patterns)
_NEVER_BUNDLED = (".flwr/", ".venv/", "__pycache__/", ".git/")


def stage_app(project_root: Path, into: Path) -> Path:
    """Copy the app's files into ``into`` without the folders Flower would leave out.

    Flower builds the bundle from every file under the app folder and only then applies
    its include/exclude patterns and the ``.gitignore``. Folders that those rules drop
    entirely (the ``.gitignore``'s folders, ``.venv``, ``.flwr``, ``.git``) are skipped
    here; everything else is copied as is (symlinks skipped, as Flower does), so Flower
    builds the same bundle from ``into``. Returns ``into``.
    """
    gitignore = project_root / ".gitignore"
    lines = gitignore.read_text(encoding="utf-8").splitlines() if gitignore.is_file() else []
    skip = pathspec.GitIgnoreSpec.from_lines([*lines, *_NEVER_BUNDLED])
    for dirpath, dirnames, filenames in os.walk(project_root, followlinks=False):
        here = Path(dirpath)
        rel = here.relative_to(project_root)
        dirnames[:] = [d for d in dirnames if not skip.match_file(f"{(rel / d).as_posix()}/")]
        for name in filenames:
            source = here / name
            if source.is_symlink():
                continue
            target = into / rel / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return into


# ---- a hospital's approved bundles --------------------------------------------------------
# One SHA-256 (hex) of a Flower app bundle (FAB) per line, optionally followed by a note;
# '#' starts a comment. The hash is Flower's own FAB hash (sha256 of the FAB's bytes).
_HASH_LINE = re.compile(r"^([0-9a-f]{64})\b\s*(.*)$")


class BundleNotApprovedError(RuntimeError):
    """The coordinator sent an app bundle this hospital has not approved; none of it ran."""


def fab_bytes(bundle: Path) -> bytes:
    """The FAB a ``.fab`` file holds, or the one ``flwr run <folder>`` would build from a folder.

    Flower builds FABs deterministically (sorted files, fixed dates), so a hospital that
    builds the reviewed source gets the very bytes the coordinator's ``flwr run`` sends.
    """
    if bundle.is_file():
        return bundle.read_bytes()
    if not (bundle / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"{bundle}: neither a .fab file nor an app folder with pyproject.toml"
        )
    from flwr.cli.build import build_fab_from_disk

    with tempfile.TemporaryDirectory(prefix="fl-imaging-approve-") as staging:
        return build_fab_from_disk(stage_app(bundle.resolve(), Path(staging)))


def bundle_hash(content: bytes) -> str:
    """Flower's FAB hash: SHA-256 (hex) of the bundle's bytes."""
    return hashlib.sha256(content).hexdigest()


def read_approved(path: Path) -> dict[str, str]:
    """A hospital's approved bundles: hash -> note.

    Raises:
        ValueError: a line is neither a comment nor ``<64 hex digits> [note]`` (file, line).
        FileNotFoundError: the file does not exist.
    """
    approved = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = _HASH_LINE.match(text)
        if match is None:
            raise ValueError(
                f"{path}:{number}: expected a 64-digit SHA-256 of an approved bundle "
                f"(`fl-imaging site approve BUNDLE`), got {text[:40]!r}"
            )
        approved[match.group(1)] = match.group(2)
    return approved


def check_approved(content: bytes, approved_file: Path) -> str:
    """The bundle's hash if ``approved_file`` lists it (read afresh: a hospital may add one).

    Raises:
        BundleNotApprovedError: it is not listed (the message names the hash and the file).
    """
    digest = bundle_hash(content)
    if digest not in read_approved(approved_file):
        raise BundleNotApprovedError(
            f"app bundle sha256 {digest} is not approved by this hospital (not in "
            f"{approved_file}); nothing of it was installed or run. To accept it, review "
            f"its source and add the line printed by `fl-imaging site approve`"
        )
    return digest
