"""Many samples into one npz: sharded over processes, resumable, memory bounded by the batch.

:func:`sample_npz` is what ``ditas sample --out X.npz`` (and ``ditas benchmark``) call. The
samples ``0 .. N-1`` are cut into shards of ``shard_size`` consecutive indices; process ``r`` of
``W`` (``torch.distributed`` when it is initialised, e.g. under ``torchrun``) samples the shards
``k`` with ``k % W == r``. Each shard is streamed batch by batch into ``images-<start>-<stop>.npy``
in the shard folder under a temporary name and renamed when complete, so the presence of that
file means the shard is done: a killed run started again with the same arguments samples only
the missing shards. Rank 0 then streams the shards, in order, into the one npz (``arr_0`` uint8
NHWC, ``labels`` int64: the ADM evaluator's layout), written atomically, and removes the shard
folder.

Because sample ``i``'s noise depends only on (seed, i) (``run.py``), the npz is byte-identical
whatever the batch size, the shard size and the number of processes.
"""

from __future__ import annotations

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
from ..fileio import atomic_file, check_writable
from .run import SamplingSettings, sample_batch

MANIFEST = "run.json"
DEFAULT_SHARD_SIZE = 1000
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same run gives the same bytes


# ----------------------------------------------------------------------------------------------
#                                 .npy / .npz streaming
# ----------------------------------------------------------------------------------------------


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


def _read_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Memory-maps a shard and checks its shape (a wrong one means a foreign or broken file)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DitasError(f"{path}: not a readable shard ({exc}); delete it to sample it again") from None
    if arr.shape != shape or arr.dtype != np.uint8:
        raise DitasError(f"{path}: holds {arr.dtype} {arr.shape}, expected uint8 {shape}; delete it to sample "
                         "it again")
    return arr


def write_npz_stream(path: Path, image_shape: tuple[int, int, int], count: int, chunks, labels: np.ndarray) -> None:
    """Writes ``arr_0`` (count, *image_shape) uint8 from ``chunks`` (uint8 arrays, in order) and
    ``labels`` into the npz ``path`` atomically, holding one chunk at a time."""
    with atomic_file(path) as tmp:
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
              image_shape: tuple[int, ...]) -> dict:
    return {"format": "ditas-sample-shards", "num": int(len(labels)), "shard_size": int(shard_size),
            "labels_sha256": hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest(),
            "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
            "image_shape": list(image_shape), "model": model_fingerprint(model)}


def _shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


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


def _check_or_write_manifest(shard_dir: Path, manifest: dict, rank: int) -> None:
    path = shard_dir / MANIFEST
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            raise DitasError(f"{path}: unreadable shard manifest; remove the folder {shard_dir}") from None
        if old.get("format") != manifest["format"]:
            raise DitasError(f"{shard_dir} holds something else than ditas sample shards; give another --shard-dir")
        diff = sorted(k for k in manifest if old.get(k) != manifest[k])
        if diff:
            raise DitasError(f"{shard_dir} holds shards of a different run (differs in {', '.join(diff)}); "
                             "use the same arguments to resume, or remove that folder")
    elif rank == 0:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2))


def sample_npz(model: nn.Module, labels: Sequence[int] | torch.Tensor | np.ndarray, out_path: str | os.PathLike,
               settings: SamplingSettings | None = None, *, batch_size: int = 64, shard_size: int | None = None,
               shard_dir: str | os.PathLike | None = None, vae=None, progress: bool = True,
               keep_shards: bool = False) -> Path | None:
    """Samples one image per label into the npz ``out_path`` (see the module docstring).

    ``settings``: steps, guidance, sampler, seed (default ``SamplingSettings()``). ``shard_dir``
    (default ``<out_path>.shards``) holds the finished shards until rank 0 has assembled them.
    Every process of the group must call this with the same arguments; rank 0 returns the npz
    path, the others None once their shards are written.
    """
    from .pipeline import check_labels, decode_to_uint8

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
        try:
            shard_size = int(json.loads(old.read_text())["shard_size"]) if old.exists() else None
        except (ValueError, KeyError, TypeError, OSError):
            shard_size = None
        # a multiple of the batch size, so that batches are cut at the same sample indices whatever the
        # number of processes: a quantized model with per-tensor activation scales shares one scale
        # per batch, so its images depend on which samples share a batch
        shard_size = shard_size or batch_size * -(-min(DEFAULT_SHARD_SIZE, max(1, -(-n // world))) // batch_size)
    if shard_size < 1:
        raise DitasError(f"--shard-size must be at least 1, got {shard_size}")
    image_shape = _image_shape(model, vae, decode_to_uint8)
    manifest = _manifest(model, labels_np, settings, shard_size, image_shape)
    if rank == 0:
        shard_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    if not shard_dir.is_dir():
        raise DitasError(f"shard folder {shard_dir} is missing (is it on a file system all processes share?)")
    _check_or_write_manifest(shard_dir, manifest, rank)
    barrier()

    ranges = _shard_ranges(n, shard_size)
    mine = [r for k, r in enumerate(ranges) if k % world == rank and not (shard_dir / shard_name(*r)).exists()]
    todo = sum(b - a for a, b in mine)
    with tqdm(total=todo, desc=f"sampling (rank {rank}/{world})" if world > 1 else "sampling", unit="img",
              disable=not progress or rank != 0, leave=False) as bar:
        for start, stop in mine:
            target = shard_dir / shard_name(start, stop)
            with atomic_file(target) as tmp:
                with open(tmp, "wb") as f:
                    f.write(_npy_header((stop - start, *image_shape), np.uint8))
                    for lo in range(start, stop, batch_size):
                        hi = min(stop, lo + batch_size)
                        x = sample_batch(model, labels_t[lo:hi], settings, range(lo, hi))
                        f.write(np.ascontiguousarray(decode_to_uint8(model, x, vae)).tobytes())
                        bar.update(hi - lo)
    barrier()
    if rank != 0:
        return None
    missing = [r for r in ranges if not (shard_dir / shard_name(*r)).exists()]
    if missing:
        raise DitasError(f"{len(missing)} shards are missing in {shard_dir} after sampling (first: "
                         f"{shard_name(*missing[0])})")

    def chunks():
        for start, stop in ranges:
            arr = _read_npy(shard_dir / shard_name(start, stop), (stop - start, *image_shape))
            for lo in range(0, len(arr), batch_size):  # a memory-mapped shard, read a batch at a time
                yield arr[lo:lo + batch_size]
            del arr

    write_npz_stream(out_path, image_shape, n, chunks(), labels_np)
    if not keep_shards:
        for start, stop in ranges:
            (shard_dir / shard_name(start, stop)).unlink(missing_ok=True)
        (shard_dir / MANIFEST).unlink(missing_ok=True)
        for stale in shard_dir.glob(".images-*.ditas-*"):  # partial shards and locks of killed processes
            stale.unlink(missing_ok=True)
        try:
            shard_dir.rmdir()
        except OSError:
            pass  # something else lives there: leave it
    return out_path
