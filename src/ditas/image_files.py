"""``ditas sample --out DIR/``: one borderless PNG per image, named by its index and its label or
prompt, instead of a bordered grid (which stays for a ``.png`` target).

The names are chosen and checked before any sampling (``folder_paths``), so a run never computes
its images and then refuses to save them, and never replaces a file it did not write without
``--overwrite``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from .errors import DitasError


def is_folder_target(out: str | os.PathLike) -> bool:
    """Whether ``--out`` names a folder: it ends in a path separator or is an existing folder."""
    text = os.fspath(out)
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def _slug(condition: Any) -> str:
    """A file-name-safe form of a label (its number) or a prompt (its first words, 40 characters)."""
    text = re.sub(r"[^a-z0-9]+", "-", str(condition).lower()).strip("-")
    return text[:40].rstrip("-") or "image"


def folder_paths(folder: str | os.PathLike, conditions: Sequence[Any], overwrite: bool = False) -> list[Path]:
    """The file of each image (``0003-<label or prompt>.png``), checked writable before the work:
    the folder is not a file, and no file is replaced without ``overwrite``."""
    from .fileio import check_new_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DitasError(f"--out {folder}: a file is there, not a folder")
    width = max(4, len(str(len(conditions) - 1)))
    paths = [folder / f"{i:0{width}d}-{_slug(c)}.png" for i, c in enumerate(conditions)]
    if folder.is_dir():
        for p in paths:
            check_new_file(p, overwrite)
    return paths


def write_images(images: Sequence[Any], paths: Sequence[Path]) -> Path:
    """Writes each image (PIL, or uint8 HxWx3 array) to its path, atomically, with no border;
    creates the folder. Returns the folder."""
    import numpy as np
    from PIL import Image

    from .fileio import atomic_file

    if len(images) != len(paths):
        raise DitasError(f"{len(images)} images for {len(paths)} file names")
    folder = paths[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths):
        im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        with atomic_file(path) as tmp:
            im.convert("RGB").save(tmp, format="PNG")
    return folder
