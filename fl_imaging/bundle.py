"""The app folder ``flwr run`` bundles, without the folders Flower would leave out anyway.

``flwr run <folder>`` (Flower 1.42, ``flwr.cli.utils.collect_files``) walks every file
under the folder and only then applies its include/exclude patterns and the
``.gitignore``. A project with its virtual environment inside has about 45,000 files
there: 2.5-4.5 s of every ``flwr run`` on this machine. :func:`stage_app` copies what
Flower would bundle to another folder, which ``flwr run`` then walks in milliseconds.
Light on purpose (no torch): the deployment script imports it too.
"""

from __future__ import annotations

import os
import shutil
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
