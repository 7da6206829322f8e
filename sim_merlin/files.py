"""Outputs that are never seen half-written: each is built under another name and renamed.

Example::

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> write_json_atomic(root / "config.json", {"a": 1})
    >>> (root / "new").mkdir(); _ = (root / "new" / "file").write_text("x")
    >>> replace_directory(root / "new", root / "out", root / ".out.old")
    >>> sorted(p.name for p in root.iterdir())
    ['config.json', 'out']
"""
from __future__ import annotations

import json
import os
import shutil


def replace_directory(new: os.PathLike | str, target: os.PathLike | str,
                      aside: os.PathLike | str) -> None:
    """Rename the complete directory ``new`` to ``target``. An existing ``target`` is first
    renamed to ``aside`` and deleted afterwards: at every instant ``target`` is the old complete
    directory or the new one (a kill between the two renames leaves it absent, never mixed)."""
    if os.path.exists(target):
        os.rename(target, aside)
        os.rename(new, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(new, target)


def write_json_atomic(path: os.PathLike | str, value) -> None:
    """Write ``value`` as JSON to ``path`` through a temporary file and a rename."""
    staging = f"{os.fspath(path)}.partial-{os.getpid()}"
    with open(staging, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
    os.replace(staging, path)
