"""The recorded calls of the blocks where a segment starts (``CalibrationRecord.segments``), in
memory or streamed to files under ``calib_cache`` (``--calib-cache``), so that memory grows with
one block's inputs, not with the length of the run.

The recorder (``calibration/recording.py``) writes them and the generic adapter's calibration
reads them back; neither needs the structure probe for that, hence a module of its own.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch

from ...errors import CalibrationError
from .base import BlockCall


class CallStore:
    """The recorded calls of one block, in memory or streamed to files under ``folder`` (one per
    call, written by this process and read back by it)."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self._calls: list[BlockCall] = []
        self._files: list[Path] = []

    def append(self, call: BlockCall) -> None:
        if self.folder is None:
            self._calls.append(call)
            return
        path = self.folder / f"{len(self._files):06d}.pt"
        torch.save({"args": call.args, "kwargs": call.kwargs}, path)
        self._files.append(path)

    def __len__(self) -> int:
        return len(self._files) if self.folder is not None else len(self._calls)

    def __getitem__(self, i: int) -> BlockCall:
        if self.folder is None:
            return self._calls[i]
        # our own file of this run (it holds arbitrary call arguments, hence the full unpickler)
        data = torch.load(self._files[i], weights_only=False)
        return BlockCall(tuple(data["args"]), dict(data["kwargs"]))

    def __iter__(self) -> Iterator[BlockCall]:
        for i in range(len(self)):
            yield self[i]


def cache_folder(calib_cache: str | Path | None, owner: Any) -> Path | None:
    """A new folder of ditas' own under ``calib_cache`` (created if missing), removed when
    ``owner`` (the record) is garbage collected; None without ``calib_cache``."""
    if calib_cache is None:
        return None
    root = Path(calib_cache)
    try:
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="ditas-calib-", dir=root))
    except OSError as exc:
        raise CalibrationError(f"--calib-cache {root}: cannot create a folder there ({exc.strerror})") from None
    weakref.finalize(owner, shutil.rmtree, folder, True)
    return folder
