"""Many samples into one npz: sharded over processes, resumable, memory bounded by the batch.

:func:`sample_npz` is what ``ditas sample --out X.npz`` (and ``ditas benchmark``) call. The
samples ``0 .. N-1`` are cut into shards of ``shard_size`` consecutive indices; process ``r`` of
``W`` (``torch.distributed`` when it is initialised, e.g. under ``torchrun``) samples the shards
``k`` with ``k % W == r`` (``batches.shares``, the split ``ditas compare`` uses too). Each shard is streamed batch by batch into ``images-<start>-<stop>.npy``
in the shard folder under a temporary name and renamed when complete, so the presence of that
file means the shard is done: a killed run started again with the same arguments samples only
the missing shards. Rank 0 then streams the shards, in order, into the one npz (``arr_0`` uint8
NHWC, ``labels`` int64: the ADM evaluator's layout), written atomically, and removes the shard
folder.

Because sample ``i``'s noise depends only on (seed, i) (``run.py``), the npz is byte-identical
whatever the batch size, the shard size and the number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import barrier, process_group
from ..errors import DitasError
from ..fileio import atomic_file, check_new_file, check_writable, path_lock
from ..readers import ArraySpec, Field, check_value, fail, read_json, read_npy, sha256_file
from .batches import sample_indices, shares
from .run import SamplingSettings

MANIFEST = "run.json"
DEFAULT_SHARD_SIZE = 1000
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same run gives the same bytes
_COUNT = Field(int, lo=1, hi=1 << 40)
MANIFEST_SCHEMA = {
    "format": Field(str), "num": Field(int, lo=0, hi=1 << 40), "shard_size": _COUNT,
    "batch_size": Field(int, required=False, lo=1, hi=1 << 40),  # missing in older runs: reported as a difference
    "labels_sha256": Field(str), "settings": Field(dict), "image_shape": Field(list, items=Field(int, lo=1, hi=1 << 20)),
    "model": Field(str)}


# ----------------------------------------------------------------------------------------------
#                                 .npy / .npz streaming
# ----------------------------------------------------------------------------------------------


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


def checksum_path(shard: Path) -> Path:
    """The file beside a finished shard holding its sha256 (written before the shard is published)."""
    return shard.with_suffix(".sha256")


def _verified_shard(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A finished shard, memory-mapped after its header, size, dtype and sha256 were checked (a
    truncated, zero-filled or foreign file is one error naming it)."""
    arr = read_npy(path, "shard", ArraySpec("u", shape))
    if arr.dtype != np.uint8:
        raise fail(path, "shard", f"holds {arr.dtype}, expected uint8; delete it to sample it again")
    side = checksum_path(path)
    try:
        with open(side, "rb") as f:
            expected = f.read(128).decode("ascii", "replace").strip()
    except OSError:
        raise fail(path, "shard", f"has no readable checksum file {side.name}; delete it to sample it again") from None
    if sha256_file(path) != expected:
        raise fail(path, "shard", f"does not match its checksum in {side.name} (corrupted); delete both to "
                   "sample it again")
    return arr


def write_npz_stream(path: Path, image_shape: tuple[int, int, int], count: int, chunks, labels: np.ndarray,
                     locked: bool = False) -> None:
    """Writes ``arr_0`` (count, *image_shape) uint8 from ``chunks`` (uint8 arrays, in order) and
    ``labels`` into the npz ``path`` atomically, holding one chunk at a time (``locked``: the caller
    holds ``path``'s lock)."""
    with atomic_file(path, locked=locked) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(zipfile.ZipInfo("arr_0.npy", _ZIP_TIME), "w", force_zip64=True) as f:
                f.write(_npy_header((count, *image_shape), np.uint8))
                written = 0
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
                    f.write(chunk.tobytes())
                    written += len(chunk)
                if written != count:
                    raise RuntimeError(f"wrote {written} images, expected {count}")
            lab = np.ascontiguousarray(labels, dtype=np.int64)
            with zf.open(zipfile.ZipInfo("labels.npy", _ZIP_TIME), "w", force_zip64=True) as f:
                f.write(_npy_header(lab.shape, np.int64))
                f.write(lab.tobytes())


# ----------------------------------------------------------------------------------------------
#                                       The run
# ----------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's weights (names, shapes, first 4096 values of each tensor)."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _manifest(model: nn.Module, labels: np.ndarray, settings: SamplingSettings, shard_size: int,
              image_shape: tuple[int, ...], batch_size: int) -> dict:
    """What identifies a run. The batch size is in it: a quantized model with per-tensor activation
    scales shares one scale per batch, so its images depend on which samples share a batch."""
    return {"format": "ditas-sample-shards", "num": int(len(labels)), "shard_size": int(shard_size),
            "batch_size": int(batch_size),
            "labels_sha256": hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest(),
            "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
            "image_shape": list(image_shape), "model": model_fingerprint(model)}


def shard_name(start: int, stop: int) -> str:
    return f"images-{start:08d}-{stop:08d}.npy"


def _image_shape(model: nn.Module, vae, decode) -> tuple[int, int, int]:
    """(H, W, 3) of one decoded image, found by decoding a zero latent."""
    c = model.config
    z = torch.zeros(1, c.in_channels, c.input_size, c.input_size, device=_device_of(model))
    return tuple(decode(model, z, vae).shape[1:])


def _device_of(model: nn.Module) -> torch.device:
    from .run import model_device

    return model_device(model)


def read_manifest(shard_dir: Path) -> dict:
    """The shard folder's ``run.json``, every field checked (one error naming file and field)."""
    path = shard_dir / MANIFEST
    data = read_json(path, "shard manifest", {"format": Field(str, required=False)})
    if data.get("format") != "ditas-sample-shards":
        raise DitasError(f"{shard_dir} holds something else than ditas sample shards; give another --shard-dir")
    check_value(data, Field(dict, schema=MANIFEST_SCHEMA), path, "shard manifest", "")
    return data


def _check_or_write_manifest(shard_dir: Path, manifest: dict, rank: int) -> None:
    path = shard_dir / MANIFEST
    if path.exists() or path.is_symlink():
        old = read_manifest(shard_dir)
        diff = sorted(k for k in manifest if old.get(k) != manifest[k])
        if diff:
            raise DitasError(f"{shard_dir} holds shards of a different run (differs in {', '.join(diff)}); "
                             "use the same arguments to resume, or remove that folder")
    elif rank == 0:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2))


def sample_npz(model: nn.Module, labels: Sequence[int] | torch.Tensor | np.ndarray, out_path: str | os.PathLike,
               settings: SamplingSettings | None = None, *, overwrite: bool = True, **kwargs) -> Path | None:
    """``_sample_npz`` (below) with ``out_path``'s lock held by rank 0 for the whole run, taken before
    the work: a second run to the same npz fails at once with a one-line error instead of sharing
    (and removing) the first one's shards. ``overwrite=False`` refuses an npz that exists, checked
    again under the lock (a run that held it may have written the npz meanwhile)."""
    path = check_writable(out_path)
    with path_lock(path) if process_group()[0] == 0 else contextlib.nullcontext():
        if process_group()[0] == 0 and not overwrite:
            check_new_file(path)
        return _sample_npz(model, labels, path, settings, **kwargs)


def _sample_npz(model: nn.Module, labels: Sequence[int] | torch.Tensor | np.ndarray, out_path: str | os.PathLike,
                settings: SamplingSettings | None = None, *, batch_size: int = 64, shard_size: int | None = None,
                shard_dir: str | os.PathLike | None = None, vae=None, progress: bool = True,
                keep_shards: bool = False) -> Path | None:
    """Samples one image per label into the npz ``out_path`` (see the module docstring).

    ``settings``: steps, guidance, sampler, seed (default ``SamplingSettings()``). ``shard_dir``
    (default ``<out_path>.shards``) holds the finished shards until rank 0 has assembled them.
    Every process of the group must call this with the same arguments; rank 0 returns the npz
    path, the others None once their shards are written.
    """
    from .images import check_labels, decode_to_uint8

    settings = settings or SamplingSettings()
    labels_t = check_labels(model, torch.as_tensor(np.asarray(labels), dtype=torch.long))
    labels_np = labels_t.numpy().astype(np.int64)
    n = len(labels_np)
    if batch_size < 1:
        raise DitasError(f"--batch-size must be at least 1, got {batch_size}")
    out_path = check_writable(out_path)
    if out_path.suffix.lower() != ".npz":
        raise DitasError(f"{out_path}: the output of sample_npz must end in .npz")
    shard_dir = Path(shard_dir) if shard_dir is not None else out_path.with_name(out_path.name + ".shards")
    rank, world = process_group()
    if shard_size is None:
        old = shard_dir / MANIFEST
        shard_size = read_manifest(shard_dir)["shard_size"] if old.exists() or old.is_symlink() else None
        # a multiple of the batch size, so that batches are cut at the same sample indices whatever the
        # number of processes: a quantized model with per-tensor activation scales shares one scale
        # per batch, so its images depend on which samples share a batch
        shard_size = shard_size or batch_size * -(-min(DEFAULT_SHARD_SIZE, max(1, -(-n // world))) // batch_size)
    if shard_size < 1:
        raise DitasError(f"--shard-size must be at least 1, got {shard_size}")
    image_shape = _image_shape(model, vae, decode_to_uint8)
    manifest = _manifest(model, labels_np, settings, shard_size, image_shape, batch_size)
    if rank == 0:
        shard_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    if not shard_dir.is_dir():
        raise DitasError(f"shard folder {shard_dir} is missing (is it on a file system all processes share?)")
    _check_or_write_manifest(shard_dir, manifest, rank)
    barrier()

    ranges = shares(n, shard_size)
    own = shares(n, shard_size, rank, world)
    for r in own:  # finished shards of an earlier run are checked before any new work
        if (shard_dir / shard_name(*r)).exists():
            _verified_shard(shard_dir / shard_name(*r), (r[1] - r[0], *image_shape))
    mine = [r for r in own if not (shard_dir / shard_name(*r)).exists()]
    todo = sum(b - a for a, b in mine)
    with tqdm(total=todo, desc=f"sampling (rank {rank}/{world})" if world > 1 else "sampling", unit="img",
              disable=not progress or rank != 0, leave=False) as bar:
        for start, stop in mine:
            target = shard_dir / shard_name(start, stop)
            with atomic_file(target) as tmp:
                digest = hashlib.sha256()
                with open(tmp, "wb") as f:
                    for block, images in _shard_blocks(model, labels_t, settings, vae, start, stop, batch_size,
                                                       image_shape):
                        f.write(block)
                        digest.update(block)
                        bar.update(images)
                with atomic_file(checksum_path(target)) as side:  # before the shard: a published shard has one
                    side.write_text(digest.hexdigest() + "\n")
    barrier()
    if rank != 0:
        return None
    missing = [r for r in ranges if not (shard_dir / shard_name(*r)).exists()]
    if missing:
        raise DitasError(f"{len(missing)} shards are missing in {shard_dir} after sampling (first: "
                         f"{shard_name(*missing[0])})")

    for start, stop in ranges:  # every checksum before the npz is started
        _verified_shard(shard_dir / shard_name(start, stop), (stop - start, *image_shape))

    def chunks():
        for start, stop in ranges:
            arr = read_npy(shard_dir / shard_name(start, stop), "shard", ArraySpec("u", (stop - start, *image_shape)))
            for lo in range(0, len(arr), batch_size):  # a memory-mapped shard, read a batch at a time
                yield arr[lo:lo + batch_size]
            del arr

    write_npz_stream(out_path, image_shape, n, chunks(), labels_np, locked=True)
    if not keep_shards:
        for start, stop in ranges:
            (shard_dir / shard_name(start, stop)).unlink(missing_ok=True)
            checksum_path(shard_dir / shard_name(start, stop)).unlink(missing_ok=True)
        (shard_dir / MANIFEST).unlink(missing_ok=True)
        for stale in shard_dir.glob(".images-*.ditas-*"):  # partial shards and locks of killed processes
            stale.unlink(missing_ok=True)
        try:
            shard_dir.rmdir()
        except OSError:
            pass  # something else lives there: leave it
    return out_path


def _shard_blocks(model: nn.Module, labels_t: torch.Tensor, settings: SamplingSettings, vae, start: int, stop: int,
                  batch_size: int, image_shape: tuple[int, ...]):
    """(bytes, images in them) of shard ``start..stop``: its .npy header, then each sampled batch."""
    yield _npy_header((stop - start, *image_shape), np.uint8), 0
    for rows, images in sample_indices(model, labels_t[start:stop], settings, batch_size, range(start, stop), vae):
        yield np.ascontiguousarray(images).tobytes(), len(rows)
