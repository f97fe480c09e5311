"""Outputs that never destroy what the user owns and never end half-written.

Every output ditas writes goes through this module:

* ``output_dir`` / ``publish_dir``: an output *folder* (a model, a ``compare`` result). The
  folder is built in a temporary sibling and published in one atomic step; an existing folder is
  replaced only with ``overwrite=True`` and only when ditas wrote it (its ``config.json`` holds
  the marker ``"ditas_output"`` listing the files it wrote, and the folder holds nothing else);
  the input model is never replaced; concurrent writers to one path are serialised by a lock.
* ``atomic_file``: one output *file*, written to a temporary sibling and renamed onto its path.
* ``check_new_file``: refuses an existing output file unless ``--overwrite`` was given.

Names of the helpers' own entries beside an output ``NAME`` (all hidden, all saying what they are):
``.NAME.ditas-lock`` (the lock, removed when the writer ends), ``.NAME.ditas-partial-PID`` (an
output being written; left behind only by a killed run and removed by the next run to ``NAME``),
``.NAME.ditas-old-PID`` (the previous output during a replacement on systems without an atomic
exchange; restored by the next run if ``NAME`` is missing).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import DitasError

MARKER_KEY = "ditas_output"
MARKER_FILE = "config.json"


# ----------------------------------------------------------------------------------------------
#                                     Checks before the work
# ----------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_parent(path: Path) -> None:
    if path.name in ("", ".", ".."):
        raise DitasError(f"cannot write {str(path) or '(empty path)'!r}: name a new file or folder")
    parent = path.parent
    if not parent.exists():
        raise DitasError(f"cannot write {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise DitasError(f"cannot write {path}: {parent} is not a folder")
    probe = parent / f".{path.name}.ditas-probe-{os.getpid()}"
    try:  # os.access is not enough: /proc says "writable" to root, then refuses the file
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise DitasError(f"cannot write {path}: folder {parent} does not accept new files "
                         f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_writable(path: str | os.PathLike) -> Path:
    """Fails early (before long work) if ``path`` cannot be created; returns it as a Path."""
    path = Path(path)
    _check_parent(path)
    if path.is_dir() and not path.is_symlink() and path.suffix:
        raise DitasError(f"cannot write {path}: it is a folder")
    return path


def check_new_file(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """An output file path that may be written: new, or an existing file with ``overwrite``.

    Called before the work, so a run never spends its compute and then refuses to save.
    """
    path = check_writable(path)
    if path.is_dir():
        raise DitasError(f"cannot write {path}: it is a folder")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise DitasError(f"{path} exists already; give --overwrite to replace it, or choose another name")
    return path


# ----------------------------------------------------------------------------------------------
#                                            Locks
# ----------------------------------------------------------------------------------------------


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.ditas-lock")


@contextlib.contextmanager
def path_lock(path: Path, wait: bool = False) -> Iterator[None]:
    """Serialises ditas writers of ``path`` (an advisory ``flock`` on ``.NAME.ditas-lock``).

    ``wait=False``: a second writer fails at once with a clear message (used by long runs, which
    take the lock before their work). The lock file is removed on release; a writer that took
    the lock re-checks that the file it locked is still the one on disk (the usual remove-safe
    protocol), and the kernel releases the lock of a killed process.
    """
    lock = _lock_path(path)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise DitasError(f"cannot write {path}: cannot create its lock file {lock} "
                             f"({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise DitasError(f"another ditas run is writing {path} (lock {lock}); wait for it to end "
                             "or choose another output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


# ----------------------------------------------------------------------------------------------
#                                       Output folders
# ----------------------------------------------------------------------------------------------


def _partials(path: Path, what: str) -> list[Path]:
    prefix = f".{path.name}.ditas-{what}-"
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix)) if path.parent.is_dir() else []


def read_marker(folder: Path) -> dict | None:
    """The ``"ditas_output"`` marker of a folder ditas wrote, or None (not a ditas output)."""
    from .readers import read_json

    try:
        data = read_json(folder / MARKER_FILE, "output marker")
    except DitasError:
        return None
    marker = data.get(MARKER_KEY)
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
        return None
    return marker


def _foreign_entries(folder: Path) -> list[str] | None:
    """Entries of ``folder`` that ditas did not write (None: the folder has no marker at all)."""
    marker = read_marker(folder)
    if marker is None:
        return None
    ours = set(marker["files"])
    return sorted(p.name for p in folder.iterdir() if p.name not in ours or p.is_symlink())


def _same_or_inside(inner: Path, outer: Path) -> bool:
    try:
        inner, outer = inner.resolve(), outer.resolve()
    except (OSError, RuntimeError):
        return False
    return inner == outer or outer in inner.parents


def _check_replaceable(path: Path, overwrite: bool, inputs: Iterable[str | os.PathLike | None]) -> None:
    for src in inputs:
        if src is not None and str(src) != "" and _same_or_inside(Path(src), path):
            raise DitasError(f"--out {path} would replace the input {src}; write the output elsewhere")
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_dir():
        raise DitasError(f"--out {path} exists and is not a folder ditas wrote; choose another name")
    if not overwrite:
        raise DitasError(f"--out {path} exists already; give --overwrite to replace a folder ditas wrote, "
                         "or choose another name")
    foreign = _foreign_entries(path)
    if foreign is None:
        raise DitasError(f"--out {path} is not a folder ditas wrote (no '{MARKER_KEY}' marker in its "
                         f"{MARKER_FILE}); ditas replaces only its own outputs: choose another name")
    if foreign:
        raise DitasError(f"--out {path} holds files ditas did not write ({', '.join(foreign[:4])}"
                         f"{' ...' if len(foreign) > 4 else ''}); ditas will not replace it: choose another name")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def recover(path: Path) -> None:
    """Repairs what a killed writer of ``path`` left (call only while holding its lock).

    A previous output parked as ``.NAME.ditas-old-*`` is restored when ``NAME`` is missing (a run
    killed between the two renames of a replacement) and removed otherwise; unfinished
    ``.NAME.ditas-partial-*`` folders are removed (no live writer owns them: we hold the lock).
    """
    olds = [p for p in _partials(path, "old") if read_marker(p) is not None]
    if olds and not (path.exists() or path.is_symlink()):
        os.replace(olds.pop(), path)
    for p in olds + _partials(path, "partial"):
        _remove(p)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one atomic step (Linux ``renameat2``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _fsync_tree(folder: Path) -> None:
    for p in [*folder.iterdir(), folder]:
        if p.is_file() or p == folder:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class OutputDir:
    """One claimed output folder: build it in ``tmp``, then ``publish()`` it (see ``output_dir``)."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind
        self._tmp: Path | None = None
        self.published = False

    @property
    def tmp(self) -> Path:
        """The folder to write into (``.NAME.ditas-partial-PID``, created on first use)."""
        if self._tmp is None:
            tmp = self.path.with_name(f".{self.path.name}.ditas-partial-{os.getpid()}")
            _remove(tmp)
            tmp.mkdir()
            tmp.chmod(0o777 & ~_umask())
            self._tmp = tmp
        return self._tmp

    def publish(self) -> Path:
        """Adds the marker to ``config.json`` and puts the whole folder at ``path`` in one step."""
        tmp = self.tmp
        cfg = tmp / MARKER_FILE
        data = json.loads(cfg.read_text()) if cfg.exists() else {}
        if not isinstance(data, dict):
            raise DitasError(f"internal error: {cfg} is not a JSON object")
        files = sorted({p.name for p in tmp.iterdir()} | {MARKER_FILE})
        data[MARKER_KEY] = {"kind": self.kind, "files": files}
        cfg.write_text(json.dumps(data, indent=2, allow_nan=False))
        for p in tmp.iterdir():
            if p.is_file():
                p.chmod(0o666 & ~_umask())
        _fsync_tree(tmp)
        if self.path.exists():
            if not _exchange(tmp, self.path):
                old = self.path.with_name(f".{self.path.name}.ditas-old-{os.getpid()}")
                os.replace(self.path, old)  # killed here: the next run restores `old`
                os.replace(tmp, self.path)
                tmp = old
            _remove(tmp)  # the previous output (under a partial/old name until removed)
        else:
            os.replace(tmp, self.path)
        self.published = True
        return self.path


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, kind: str, *, overwrite: bool = False,
               inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[OutputDir]:
    """Claims the output folder ``path`` for one run; enter it BEFORE the long work.

    Contract:
    * On entry, fails with a one-line ``DitasError`` unless the output can be written: the parent
      folder exists and accepts files; ``path`` is new, or ``overwrite`` is true and ``path`` is a
      folder ditas wrote (marker in its ``config.json``) holding nothing but what ditas wrote;
      ``path`` is not one of ``inputs`` (the input model) nor a folder containing one; and no
      other ditas run holds ``path``'s lock (taken here and held until exit).
    * Also on entry, repairs what a killed writer of ``path`` left behind (see ``recover``).
    * The caller writes every file of the output into ``claim.tmp`` and calls ``claim.publish()``:
      the marker ``{"ditas_output": {"kind": kind, "files": [...]}}`` is merged into (or makes)
      ``config.json``, and the folder appears at ``path`` whole, in one atomic step (``renameat2``
      exchange where the system has it). Until then the previous output, if any, is untouched.
    * On exit without ``publish()`` (an error, Ctrl-C), the partial folder is removed; a run killed
      with SIGKILL leaves only ``.NAME.ditas-partial-PID``, which the next run to ``path`` removes.
    """
    path = Path(path)
    _check_parent(path)
    _check_replaceable(path, overwrite, inputs)  # early, cheap refusal (re-checked under the lock)
    with path_lock(path):
        recover(path)
        _check_replaceable(path, overwrite, inputs)
        claim = OutputDir(path, kind)
        try:
            yield claim
        finally:
            if claim._tmp is not None and not claim.published:
                _remove(claim._tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str = "ditas-output", overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder that is published at ``path`` on success (``output_dir``)."""
    with output_dir(path, kind, overwrite=overwrite) as claim:
        yield claim.tmp
        claim.publish()


def publish_dir(path: str | os.PathLike, kind: str, write: Callable[[Path], None], *, overwrite: bool = False,
                inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """``write(folder)`` fills a temporary folder that is then published at ``path`` (``output_dir``)."""
    with output_dir(path, kind, overwrite=overwrite, inputs=inputs) as claim:
        write(claim.tmp)
        return claim.publish()


def _non_finite_key(obj, where: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(top level)"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite_key(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def json_text(obj, what: str = "output") -> str:
    """Strict JSON (no NaN/inf, which JSON does not have); a non-finite number is a DitasError naming it."""
    bad = _non_finite_key(obj)
    if bad is not None:
        raise DitasError(f"{what}: {bad} is not a finite number; refusing to write invalid JSON")
    return json.dumps(obj, indent=2, allow_nan=False)


# ----------------------------------------------------------------------------------------------
#                                         Output files
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields ``.NAME.ditas-partial-PID.SUFFIX`` beside ``path``; renames it onto ``path`` on success.

    Writers of one path take turns (``path_lock`` with waiting); a partial file left by a killed
    writer is removed by the next one.
    """
    path = check_writable(path)
    with path_lock(path, wait=True):
        prefix = f".{path.name}.ditas-partial-"
        for p in _partials(path, "partial"):
            if p.is_file() and p.name.startswith(prefix):
                p.unlink()
        tmp_path = path.with_name(f"{prefix}{os.getpid()}{path.suffix}")
        fd = os.open(tmp_path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o666)
        os.close(fd)
        try:
            yield tmp_path
            os.replace(tmp_path, path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()
