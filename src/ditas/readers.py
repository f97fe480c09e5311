"""Reading files ditas did not necessarily write (configs, manifests, npz arrays), safely.

Every reader here treats its file as untrusted: sizes are bounded before anything is allocated,
nesting depth is bounded before the JSON parser recurses, arrays are never unpickled, declared
shapes are checked against the bytes really present, and every failure is one
:class:`InputFileError` line naming the file and the field, without library advice to load
unsafely (``allow_pickle`` / ``weights_only=False``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tokenize
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import DitasError, InputFileError

MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 64
MAX_DEFLATE_RATIO = 1032  # deflate cannot expand more: a bound on a member's true size
_UNSAFE_ADVICE = ("weights_only", "allow_pickle", "weights only load failed", "unsafe", "trust the source")


def fail(path: Path | str, what: str, message: str) -> InputFileError:
    """The one-line error of a reader: ``WHAT PATH: MESSAGE`` (newlines folded)."""
    return InputFileError(" ".join(f"{what} {path}: {message}".split()))


def safe_reason(exc: BaseException) -> str:
    """A library's error message, less any advice to load the file unsafely (which could run code
    from it): the offending global when torch names one, else the first line without such advice."""
    text = str(exc).strip()
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return f"it holds a Python object of type {m.group(1)}, not only tensors; ditas does not run code from files"
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not any(a in ln.lower() for a in _UNSAFE_ADVICE)]
    if not lines:
        return "it holds objects other than plain arrays" if text else type(exc).__name__
    return lines[0] if len(lines[0]) <= 200 else lines[0][:200] + "..."


def _check_regular_file(path: Path, what: str) -> None:
    if not path.exists():
        raise fail(path, what, "no such file")
    if path.is_dir():
        raise fail(path, what, "is a folder, expected a file")
    if not path.is_file():
        raise fail(path, what, "is not a regular file")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, streamed (memory: one chunk)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
#                                              JSON
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """What one JSON field must be: its type(s), a range or choices, a nested schema or item rule."""

    kind: type | tuple[type, ...]
    required: bool = True
    lo: float | None = None
    hi: float | None = None
    choices: tuple | None = None
    schema: dict[str, "Field"] | None = None  # for objects
    items: "Field | None" = None  # for lists


def json_depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, brackets inside strings skipped: vectorised and
    linear (no recursion, no regular expression that could backtrack on a broken string)."""
    codes = np.frombuffer(raw, dtype=np.uint8)
    if not len(codes):
        return 0
    idx = np.arange(len(codes))
    backslash = codes == ord("\\")
    last_other = np.maximum.accumulate(np.where(backslash, -1, idx))  # last non-backslash at or before i
    run_before = np.empty(len(codes), dtype=np.int64)  # backslashes right before i
    run_before[0] = 0
    run_before[1:] = idx[:-1] - last_other[:-1]
    quote = (codes == ord('"')) & (run_before % 2 == 0)  # an unescaped quote opens or closes a string
    outside = np.cumsum(quote) % 2 == 0  # a closing quote counts as outside: it is no bracket
    step = (np.isin(codes, (ord("["), ord("{"))).astype(np.int64) - np.isin(codes, (ord("]"), ord("}")))) * outside
    return int(np.cumsum(step).max(initial=0))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number ditas accepts")


def read_json(path: str | Path, what: str, schema: dict[str, Field] | None = None,
              top: type | tuple[type, ...] = dict, error: type[DitasError] = InputFileError,
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH, foreign: bool = False) -> Any:
    """The parsed JSON file ``path`` (``what`` names it in errors: "config", "run manifest", ...).

    Checked in this order, each failure one ``error`` (an :class:`InputFileError` unless the caller
    reports its files as another ``DitasError``, e.g. ``CheckpointError``): a regular readable file
    of at most ``max_bytes``, UTF-8, nesting at most ``max_depth`` (scanned before parsing, so no
    RecursionError), valid JSON with finite numbers, a ``top`` value, then ``schema`` field by field.
    """
    try:
        return _read_json(Path(path), what, schema, top, max_bytes, max_depth, foreign)
    except InputFileError as exc:
        if error is InputFileError:
            raise
        raise error(str(exc)) from None


def _read_json(path: Path, what: str, schema: dict[str, Field] | None, top: type | tuple[type, ...],
               max_bytes: int, max_depth: int, foreign: bool) -> Any:
    _check_regular_file(path, what)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise fail(path, what, f"cannot be read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise fail(path, what, f"larger than {max_bytes >> 20} MiB; not a file ditas wrote")
    return parse_json(raw, path, what, schema, top, max_depth=max_depth, foreign=foreign)


def parse_json(raw: bytes | str, path: Path | str, what: str, schema: dict[str, Field] | None = None,
               top: type | tuple[type, ...] = dict, error: type[DitasError] = InputFileError,
               max_depth: int = MAX_JSON_DEPTH, foreign: bool = False) -> Any:
    """JSON text from a file or a file's metadata (``path`` names where it came from), checked as
    :func:`read_json` checks a file's content; ``foreign``: another library's file (diffusers
    scheduler configs hold ``-Infinity``), whose non-finite numbers are left to that library."""
    raw = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    try:
        depth = json_depth(raw)
        if depth > max_depth:
            raise fail(path, what, f"nested {depth} levels deep (at most {max_depth} accepted)")
        try:
            data = json.loads(raw.decode("utf-8"), **({} if foreign else {"parse_constant": _no_constant}))
        except UnicodeDecodeError:
            raise fail(path, what, "not UTF-8 text") from None
        except (ValueError, RecursionError) as exc:
            raise fail(path, what, f"not valid JSON ({exc})") from None
        bad = None if foreign else _first_nonfinite(data)
        if bad is not None:
            raise fail(path, what, f"field '{bad}' is a number out of range (inf)")
        check_value(data, Field(top, schema=schema), Path(path), what, "")
    except InputFileError as exc:
        if error is InputFileError:
            raise
        raise error(str(exc)) from None
    return data


def _first_nonfinite(data: Any) -> str | None:
    """Where the first infinite float is (``1e400`` parses to inf), walked without recursion."""
    stack = [("", data)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return name or "(the file)"
        if isinstance(value, dict):
            stack.extend((_join(name, str(k)), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{name}[{i}]", v) for i, v in enumerate(value))
    return None


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "true or false", type(None): "null"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _is_kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def check_value(value: Any, spec: Field, path: Path, what: str, name: str) -> None:
    """Checks ``value`` (the field ``name``, "" for the whole file) against ``spec``, recursively
    over nested schemas (depth already bounded by :func:`read_json`)."""
    where = f"field '{name}'" if name else "the file"
    if not _is_kind(value, spec.kind):
        raise fail(path, what, f"{where} must be {_type_name(spec.kind)}, got {_short(value)}")
    if spec.choices is not None and value not in spec.choices:
        raise fail(path, what, f"{where} must be one of {', '.join(map(repr, spec.choices))}, got {_short(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (spec.lo is not None and value < spec.lo) or (spec.hi is not None and value > spec.hi):
            raise fail(path, what, f"{where} must be in [{spec.lo}, {spec.hi}], got {_short(value)}")
    if isinstance(value, dict) and spec.schema is not None:
        for key, sub in spec.schema.items():
            if key not in value:
                if sub.required:
                    raise fail(path, what, f"field '{_join(name, key)}' is missing")
                continue
            check_value(value[key], sub, path, what, _join(name, key))
    if isinstance(value, list) and spec.items is not None:
        for i, item in enumerate(value):
            check_value(item, spec.items, path, what, f"{name}[{i}]")


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------------------------
#                                           npz arrays
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArraySpec:
    """What one npz member must be: dtype kinds (numpy ``dtype.kind`` letters), a shape pattern
    (None: any size on that axis), finiteness; ``load=False``: only its header is read (big arrays
    streamed by the caller)."""

    kinds: str
    shape: tuple[int | None, ...] | None = None
    required: bool = True
    finite: bool = False
    load: bool = True


@dataclass(frozen=True)
class NpyHeader:
    """A checked ``.npy`` member header: where its data starts and how many bytes it holds."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    data_offset: int
    nbytes: int


@dataclass
class NpzArrays:
    """What :func:`read_npz_arrays` read: loaded arrays, headers of the others, all member names."""

    path: Path
    arrays: dict[str, np.ndarray]
    headers: dict[str, NpyHeader]
    keys: list[str]


def read_npy_header(f, path: Path, what: str, name: str, size: int) -> NpyHeader:
    """Parses a member's ``.npy`` header from the open stream ``f`` (left at the data) and checks
    that the claimed ``shape x itemsize`` is exactly the ``size - header`` bytes there."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    # numpy parses the header with ast/tokenize: a corrupted one raises any of these
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, tokenize.TokenError, RecursionError,
            zipfile.BadZipFile) as exc:
        raise fail(path, what, f"'{name}' has no valid .npy header ({safe_reason(exc)})") from None
    if dtype.hasobject:
        raise fail(path, what, f"'{name}' holds Python objects; ditas reads only plain numeric arrays")
    offset = f.tell() if hasattr(f, "tell") else 0
    nbytes = math.prod(int(s) for s in shape) * dtype.itemsize
    if nbytes != size - offset:
        raise fail(path, what, f"'{name}' claims shape {tuple(shape)} of {dtype} ({nbytes} bytes) but holds "
                               f"{max(size - offset, 0)} bytes of data (truncated or corrupted)")
    return NpyHeader(name, tuple(int(s) for s in shape), dtype, bool(fortran), offset, nbytes)


def _member_size(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, what: str, file_size: int) -> int:
    """The member's uncompressed size, refused when the archive's own numbers cannot be true."""
    if info.header_offset + info.compress_size > file_size:
        raise fail(path, what, f"'{info.filename}' extends past the end of the file (truncated)")
    stored = info.compress_type == zipfile.ZIP_STORED
    if (stored and info.file_size != info.compress_size) or info.file_size > info.compress_size * MAX_DEFLATE_RATIO + 1024:
        raise fail(path, what, f"'{info.filename}' declares {info.file_size} bytes, more than its "
                               f"{info.compress_size} stored bytes can hold (corrupted)")
    return info.file_size


def _check_array(header: NpyHeader, spec: ArraySpec, path: Path, what: str) -> None:
    if header.dtype.kind not in spec.kinds:
        raise fail(path, what, f"'{header.name}' has dtype {header.dtype}, expected {_kinds_text(spec.kinds)}")
    if spec.shape is not None and (len(header.shape) != len(spec.shape) or any(
            want is not None and want != got for want, got in zip(spec.shape, header.shape))):
        pattern = "(" + ", ".join("N" if s is None else str(s) for s in spec.shape) + ")"
        raise fail(path, what, f"'{header.name}' has shape {header.shape}, expected {pattern}")


def _kinds_text(kinds: str) -> str:
    names = {"u": "unsigned integers", "i": "integers", "f": "floats", "b": "booleans", "U": "text", "S": "bytes"}
    return " or ".join(names.get(k, k) for k in kinds)


def _load_member(f, header: NpyHeader, path: Path, what: str, chunk: int = 1 << 24) -> np.ndarray:
    """The member's data into one array of the (already checked) size, read chunk by chunk."""
    out = np.empty(header.shape[::-1] if header.fortran else header.shape, dtype=header.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
    pos = 0
    while pos < header.nbytes:
        got = f.readinto(view[pos:pos + chunk])
        if not got:
            raise fail(path, what, f"'{header.name}' is truncated ({pos} of {header.nbytes} bytes)")
        pos += got
    return out.T if header.fortran else out


def _is_npy(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


def read_npz_arrays(path: str | Path, what: str, expected: dict[str, ArraySpec]) -> NpzArrays:
    """The members ``expected`` of the npz ``path``, each checked before its data is allocated
    (header, dtype kind, shape pattern, claimed bytes against the bytes present), never unpickled;
    ``finite`` members are checked for NaN and inf. Members not in ``expected`` are not read."""
    path = Path(path)
    _check_regular_file(path, what)
    try:
        file_size = path.stat().st_size
        if _is_npy(path):
            raise fail(path, what, "is a plain .npy array, expected an .npz archive (np.savez)")
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
            arrays, headers = {}, {}
            for name, spec in expected.items():
                if name not in infos:
                    if spec.required:
                        raise fail(path, what, f"has no '{name}' array (found: {', '.join(sorted(infos)) or 'none'})")
                    continue
                size = _member_size(zf, infos[name], path, what, file_size)
                with zf.open(infos[name]) as f:
                    header = read_npy_header(f, path, what, name, size)
                    _check_array(header, spec, path, what)
                    headers[name] = header
                    if spec.load:
                        arrays[name] = _load_member(f, header, path, what)
                if spec.finite and name in arrays:
                    check_finite([(name, arrays[name])], path, what)
    except DitasError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise fail(path, what, f"not a readable .npz archive ({safe_reason(exc)})") from None
    return NpzArrays(path, arrays, headers, sorted(infos))


def read_npy(path: str | Path, what: str, spec: ArraySpec) -> np.ndarray:
    """A plain ``.npy`` file, memory-mapped read-only after its header and size are checked."""
    path = Path(path)
    _check_regular_file(path, what)
    try:
        with open(path, "rb") as f:
            header = read_npy_header(f, path, what, path.name, path.stat().st_size)
    except OSError as exc:
        raise fail(path, what, f"cannot be read ({exc.strerror or exc})") from None
    _check_array(header, spec, path, what)
    if header.nbytes == 0:
        return np.empty(header.shape, header.dtype)
    arr = np.memmap(path, dtype=header.dtype, mode="r", offset=header.data_offset,
                    shape=header.shape, order="F" if header.fortran else "C")
    return arr


def check_finite(arrays: Iterable[tuple[str, np.ndarray]], path: Path, what: str) -> None:
    """Every named float array is finite (one error naming the first that is not)."""
    for name, arr in arrays:
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise fail(path, what, f"'{name}' holds NaN or inf")
