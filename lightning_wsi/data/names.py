"""File names built from data: a slide id is data, never a path.

Every file named after a slide (coordinate cache entries, heatmaps, anything a report writes)
goes through :func:`safe_name`, and :func:`inside` checks that the result stays in its folder, so
an id like ``../../x``, ``/abs/x`` or ``a/b`` can neither escape the output folder nor make a
write fail halfway through a run.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

__all__ = ["inside", "safe_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_LENGTH = 80


def safe_name(text: str, max_length: int = _MAX_LENGTH) -> str:
    """``text`` reduced to ``[A-Za-z0-9._-]``, at most ``max_length`` characters, never empty
    and never a dot name (``.``, ``..``, hidden). Different ids may map to the same name; callers
    that need unique names add a digest (:func:`inside` with ``unique=True``).

    Example:
        >>> safe_name("../../etc/passwd"), safe_name("a/b c"), safe_name("..")
        ('etc_passwd', 'a_b_c', 'unnamed')
    """
    name = _UNSAFE.sub("_", str(text)).strip("._-")[:max_length].strip("._-")
    return name or "unnamed"


def inside(folder: str | os.PathLike, name: str, suffix: str = "", unique: bool = False) -> Path:
    """``folder / (safe_name(name) + suffix)``, checked to lie directly inside ``folder``.

    Args:
        folder: The output folder.
        name: Data (a slide id): sanitised here.
        suffix: File extension, e.g. ``".png"``.
        unique: Append a short digest of ``name`` so that distinct names never collide.

    Raises:
        ValueError: The path would leave ``folder`` (cannot happen for a sanitised name; the
            check guards against future changes to the sanitiser).

    Example:
        >>> inside("/runs/1/heatmaps", "../../x", ".png").as_posix()
        '/runs/1/heatmaps/x.png'
    """
    stem = safe_name(name)
    if unique:
        stem += "-" + hashlib.sha1(str(name).encode()).hexdigest()[:10]
    folder = Path(folder)
    path = folder / f"{stem}{suffix}"
    if path.resolve().parent != folder.resolve():
        raise ValueError(f"file name {name!r} would leave the folder {folder}")
    return path
