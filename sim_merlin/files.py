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
import re
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
    """Write ``value`` as JSON to ``path`` through a temporary file and a rename (the temporary
    file of a writer that failed, or was killed, is removed)."""
    path = os.fspath(path)
    prefix = f"{os.path.basename(path)}.partial-"
    remove_abandoned(os.path.dirname(path) or ".", prefix)
    staging = f"{path}.partial-{os.getpid()}"
    try:
        with open(staging, "w") as handle:
            json.dump(value, handle, indent=2, sort_keys=True)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_abandoned(parent: os.PathLike | str, prefix: str) -> list[str]:
    """Delete the entries of ``parent`` named ``{prefix}{pid}`` (or ``{prefix}{pid}.<more>``)
    whose process ``pid`` no longer runs: the staging directories of killed writers. Returns
    the names deleted."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)(\..*)?$")
    removed = []
    for name in sorted(os.listdir(parent)):
        match = pattern.match(name)
        if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
            path = os.path.join(parent, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(name)
    return removed
