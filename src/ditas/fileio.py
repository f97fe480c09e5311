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

Every one of them is created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``, ``mkdir``), so an entry
planted at one of these predictable names (a symbolic link, another user's file) is never followed,
written through, published nor deleted: ditas then takes a name with a random part, or refuses.
Only what ditas itself made (a real file or folder of this user, never a link) is ever removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import math
import os
import re
import secrets
import shutil
import stat
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
    probe = parent / f".{path.name}.ditas-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:  # os.access is not enough: /proc says "writable" to root, then refuses the file
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise DitasError(f"cannot write {path}: folder {parent} does not accept new files "
                         f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_writable(path: str | os.PathLike) -> Path:
    """Fails early (before long work) if ``path`` cannot be created; returns it as a Path."""
    if not os.fspath(path).strip():  # Path("") is ".", which would name the current folder
        raise DitasError("cannot write an empty path: name a new file or folder")
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


def _same_file(a: Path, b: Path) -> bool:
    """One file under two names (a link, a hard link, ``./x`` and ``x``)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _same_or_inside(inner: Path, outer: Path) -> bool:
    try:
        inner, outer = inner.resolve(), outer.resolve()
    except (OSError, RuntimeError):
        return False
    return inner == outer or outer in inner.parents


def check_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                    flag: str = "--out") -> None:
    """Refuses an output that is one of the run's inputs or holds one (``--json s.npz`` beside the
    samples ``s.npz``): writing it would replace what the run reads, so the input would be lost."""
    out = Path(out)
    for src in inputs:
        if src is None or str(src) == "":
            continue
        if _same_file(Path(src), out) or _same_or_inside(Path(src), out):
            raise DitasError(f"{flag} {out} would replace the input {src}; write the output elsewhere")


# ----------------------------------------------------------------------------------------------
#                                            Locks
# ----------------------------------------------------------------------------------------------


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.ditas-lock")


def _own(p: Path, folder: bool) -> os.stat_result | None:
    """``p``'s status when it is an entry ditas could have made there (a real folder, or a regular
    file with one name, owned by this user; never a link), else None: only those are removed."""
    try:
        st = os.lstat(p)
    except OSError:
        return None
    kind = stat.S_ISDIR(st.st_mode) if folder else (stat.S_ISREG(st.st_mode) and st.st_nlink == 1)
    return st if kind and st.st_uid == os.geteuid() else None


def _open_lock(path: Path, lock: Path) -> int:
    """Opens (or creates) the lock file without following a link; refuses anything but our own file."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        why = "it is a symbolic link ditas did not make; remove it" if exc.errno == errno.ELOOP \
            else exc.strerror or str(exc)
        raise DitasError(f"cannot write {path}: cannot open its lock file {lock} ({why})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise DitasError(f"cannot write {path}: its lock file {lock} is not a file ditas made (not a regular "
                         "file of this user); remove it")
    return fd


@contextlib.contextmanager
def path_lock(path: Path, wait: bool = False) -> Iterator[None]:
    """Serialises ditas writers of ``path`` (an advisory ``flock`` on ``.NAME.ditas-lock``).

    ``wait=False``: a second writer fails at once with a clear message (used by long runs, which
    take the lock before their work). The lock file is removed on release; a writer that took
    the lock re-checks that the file it locked is still the one on disk (the usual remove-safe
    protocol), and the kernel releases the lock of a killed process. A link planted at the lock's
    name is never followed (see ``_open_lock``).
    """
    lock = _lock_path(path)
    while True:
        fd = _open_lock(path, lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise DitasError(f"another ditas run is writing {path} (lock {lock}); wait for it to end "
                             "or choose another output") from None
        mine = os.fstat(fd)
        on_disk = _own(lock, folder=False)
        if on_disk is not None and (on_disk.st_ino, on_disk.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    try:
        yield
    finally:
        on_disk = _own(lock, folder=False)
        if on_disk is not None and (on_disk.st_ino, on_disk.st_dev) == (mine.st_ino, mine.st_dev):
            os.unlink(lock)
        os.close(fd)


# ----------------------------------------------------------------------------------------------
#                                       Output folders
# ----------------------------------------------------------------------------------------------


def _partials(path: Path, what: str, folder: bool) -> list[Path]:
    """ditas' own ``.NAME.ditas-WHAT-*`` entries beside ``path`` (what a killed writer left)."""
    prefix = f".{path.name}.ditas-{what}-"
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix) and _own(p, folder) is not None)


def read_marker(folder: Path) -> dict | None:
    """The ``"ditas_output"`` marker of a folder ditas wrote, or None (not a ditas output)."""
    from .readers import read_json

    try:
        data = read_json(folder / MARKER_FILE, "output marker")
    except DitasError:
        return None
    marker = data.get(MARKER_KEY) if isinstance(data, dict) else None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
        return None
    return marker


def _marker_layout(marker: dict) -> dict:
    """The marker as a layout (see ``unexpected_entries``): what ditas wrote, by kind. A marker of
    an older ditas lists names only, all taken as files (its sub-folders cannot be checked)."""
    def layout(level) -> dict:
        if not isinstance(level, dict):
            return {"files": [], "dirs": {}}
        files = [re.escape(n) for n in level.get("files", []) if isinstance(n, str)]
        dirs = level.get("dirs") if isinstance(level.get("dirs"), dict) else {}
        return {"files": files, "dirs": {re.escape(k): layout(v) for k, v in dirs.items()}}
    return layout(marker)


def _listing(folder: Path) -> dict:
    """The marker's record of a folder: ``{"files": [...], "dirs": {name: listing}}``, by kind."""
    files, dirs = [], {}
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not p.is_symlink():
            dirs[p.name] = _listing(p)
        else:
            files.append(p.name)
    return {"files": files, "dirs": dirs}


def unexpected_entries(folder: Path, layout: dict, prefix: str = "") -> list[str]:
    """Entries under ``folder`` (recursively) that ``layout`` does not name with their kind.

    ``layout`` is ``{"files": [regex, ...], "dirs": {regex: layout}}`` (names matched whole): an entry
    is expected only as a regular file where a file is named, or a real folder where a folder is,
    never a link. What this returns is what ``--overwrite`` would delete without ditas having
    written it (a user file in a ditas sub-folder, a folder where ditas wrote a file).
    """
    found = []
    for p in sorted(folder.iterdir()):
        st = os.lstat(p)
        rel = prefix + p.name
        if stat.S_ISREG(st.st_mode) and any(re.fullmatch(r, p.name) for r in layout.get("files", [])):
            continue
        sub = next((v for k, v in layout.get("dirs", {}).items() if re.fullmatch(k, p.name)), None)
        if stat.S_ISDIR(st.st_mode) and sub is not None:
            found += unexpected_entries(p, sub, rel + "/")
        else:
            found.append(rel + ("/" if stat.S_ISDIR(st.st_mode) else ""))
    return found


def foreign_entries(folder: Path) -> list[str] | None:
    """Entries of the ditas output ``folder`` that ditas did not write, checked by kind down every
    sub-folder (None: the folder has no marker, so it is not a ditas output at all)."""
    marker = read_marker(folder)
    if marker is None:
        return None
    return unexpected_entries(folder, _marker_layout(marker))


def _check_replaceable(path: Path, overwrite: bool, inputs: Iterable[str | os.PathLike | None]) -> None:
    check_not_input(path, inputs)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_dir():
        raise DitasError(f"--out {path} exists and is not a folder ditas wrote; choose another name")
    if not overwrite:
        raise DitasError(f"--out {path} exists already; give --overwrite to replace a folder ditas wrote, "
                         "or choose another name")
    refuse_foreign(path, foreign_entries(path))


def refuse_foreign(path: Path, foreign: list[str] | None) -> None:
    """The one-line refusal to replace ``path`` when it is not ditas' or holds what ditas did not write."""
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
    Only real folders of this user count (``_own``): a planted link is neither restored nor removed.
    """
    olds = [p for p in _partials(path, "old", folder=True) if read_marker(p) is not None]
    if olds and not (path.exists() or path.is_symlink()):
        os.replace(olds.pop(), path)
    for p in olds + _partials(path, "partial", folder=True):
        _remove(p)


def _private_name(path: Path, suffix: str, create: Callable[[Path], None], folder: bool) -> Path:
    """Creates ``.NAME.ditas-partial-PID`` + ``suffix`` with ``create`` (which must fail on an existing
    entry, links included); where something not ours sits at that predictable name, a name with a
    random part is used instead, so a planted entry is never followed nor removed."""
    base = f".{path.name}.ditas-partial-{os.getpid()}"
    name = path.with_name(base + suffix)
    for _ in range(16):
        try:
            create(name)
            return name
        except FileExistsError:
            if _own(name, folder) is not None and name.name == base + suffix:
                _remove(name)  # our own leftover (a dead process with our PID)
                continue
            name = path.with_name(f"{base}-{secrets.token_hex(6)}{suffix}")
    raise DitasError(f"cannot write {path}: cannot create a partial entry beside it")


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
        if self._tmp is None:  # mkdir never follows a planted link; its mode already honours the umask
            self._tmp = _private_name(self.path, "", lambda p: p.mkdir(mode=0o777), folder=True)
        return self._tmp

    def publish(self) -> Path:
        """Adds the marker to ``config.json`` and puts the whole folder at ``path`` in one step."""
        tmp = self.tmp
        cfg = tmp / MARKER_FILE
        data = json.loads(cfg.read_text()) if cfg.exists() else {}
        if not isinstance(data, dict):
            raise DitasError(f"internal error: {cfg} is not a JSON object")
        listing = _listing(tmp)
        data[MARKER_KEY] = {"kind": self.kind, "files": sorted(set(listing["files"]) | {MARKER_FILE}),
                            "dirs": listing["dirs"]}
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


def check_output_dir(path: str | os.PathLike, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """``output_dir``'s refusals alone, for a run that claims the folder only after its work."""
    path = Path(path)
    _check_parent(path)
    _check_replaceable(path, overwrite, inputs)
    return path


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


def _create_file(p: Path) -> None:
    """Creates the empty file ``p``, failing on any existing entry (a link included: never followed)."""
    os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY | os.O_CLOEXEC, 0o666))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, locked: bool = False) -> Iterator[Path]:
    """Yields ``.NAME.ditas-partial-PID.SUFFIX`` beside ``path``; renames it onto ``path`` on success.

    Writers of one path take turns (``path_lock`` with waiting; ``locked=True``: the caller holds
    that lock already); a partial file left by a killed writer is removed by the next one. The
    partial file is created exclusively, and is checked to be still our file before it is
    renamed, so the published output is never a link planted beside it.
    """
    path = check_writable(path)
    with contextlib.nullcontext() if locked else path_lock(path, wait=True):
        for p in _partials(path, "partial", folder=False):
            p.unlink()
        tmp_path = _private_name(path, path.suffix, _create_file, folder=False)
        made = os.lstat(tmp_path)
        try:
            yield tmp_path
            now = _own(tmp_path, folder=False)
            if now is None or (now.st_ino, now.st_dev) != (made.st_ino, made.st_dev):
                raise DitasError(f"cannot write {path}: its partial file {tmp_path} was replaced by another "
                                 "program while ditas wrote it")
            os.replace(tmp_path, path)
        finally:
            now = _own(tmp_path, folder=False)
            if now is not None and (now.st_ino, now.st_dev) == (made.st_ino, made.st_dev):
                tmp_path.unlink()
