"""The ADM evaluation protocol (FID, sFID, IS, precision, recall) on sample and reference ``.npz`` files.

These are the definitions of openai/guided-diffusion ``evaluations/evaluator.py``, which DiT and
the DiT quantization papers (DiTAS, PTQ4DiT, Q-DiT) report:

- FID: Fréchet distance of Gaussians fitted to Inception ``pool_3`` features (2048-d);
- sFID: the same on the first 7 channels of ``mixed_6/conv``, flattened (2023-d);
- IS: ``exp(E_x KL(p(y|x) || p(y)))`` of the 1008-way softmax, averaged over splits of 5000;
- precision / recall: Kynkäänniemi et al.'s k-NN manifolds (k = 3) in pool_3 space: precision is
  the fraction of samples inside the union of balls around the reference features (radius: the
  distance to the k-th nearest reference neighbour, the point itself counted as the 0th), recall
  the fraction of reference features inside the samples' manifold.

A reference batch that carries ``mu``/``sigma``/``mu_s``/``sigma_s`` (ADM's ``VIRTUAL_*.npz``)
has its FID and sFID statistics taken from those arrays, as ADM does; its images still give the
pool features that precision/recall need.

Where we differ from ADM in arithmetic, not in definition: (1) ``tr sqrt(S1 S2)`` comes from
symmetric eigenvalue problems (:func:`trace_sqrt_product`) instead of scipy's ``sqrtm`` of the
non-symmetric product: the same number for well-conditioned covariances, exact (FID 0) for
identical rank-deficient ones where ``sqrtm`` leaves noise, and a small problem when a set has
fewer points than dimensions; (2) pairwise distances are float64, where ADM computes them in
float16 first (falling back to float32 on overflow).

Memory: images are streamed from the npz in batches; features are kept (N x 2048 float32 for the
pool, covariance sums only for the spatial features); distance blocks are ``block x block``.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DitasError
from ..fileio import atomic_file

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
CACHE_FORMAT = "ditas-adm-reference-cache-v1"


# ----------------------------------------------------------------------------------------------
#                                  Reading npz files in batches
# ----------------------------------------------------------------------------------------------


class NpzImages:
    """The ``arr_0`` uint8 NHWC images of an ADM-style ``.npz``, read in batches (memory: one batch).

    The header is checked on construction, so a wrong file fails before any long work with one line
    naming it. Other small arrays (``labels``, ``mu``, ...) are read with :meth:`small_array`.
    """

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path = Path(path)
        self.key = key
        if not self.path.exists():
            raise DitasError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise DitasError(f"{self.path}: is a folder, expected an .npz file")
        try:
            with zipfile.ZipFile(self.path) as zf:
                self.keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
                if f"{key}.npy" not in zf.namelist():
                    raise DitasError(f"{self.path}: no '{key}' array (found: {', '.join(self.keys) or 'none'}); "
                                     "expected uint8 images under 'arr_0' as the ADM evaluator reads them")
                with zf.open(f"{key}.npy") as f:
                    shape, fortran, dtype, streamable = _read_header(f)
        except DitasError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise DitasError(f"{self.path}: not a readable .npz file ({exc})") from None
        if dtype != np.uint8:
            raise DitasError(f"{self.path}: '{key}' has dtype {dtype}, expected uint8 images in [0, 255]")
        if len(shape) != 4 or shape[-1] not in (1, 3):
            raise DitasError(f"{self.path}: '{key}' has shape {tuple(shape)}; expected (N, H, W, 3) uint8 images")
        if shape[0] < 1 or shape[1] < 1 or shape[2] < 1:
            raise DitasError(f"{self.path}: '{key}' holds no images (shape {tuple(shape)})")
        self.shape = tuple(int(s) for s in shape)
        self.streamable = streamable and not fortran

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yields (B, H, W, 3) uint8 batches in order (grey images replicated to 3 channels)."""
        n, h, w, c = self.shape
        per_image = h * w * c
        try:
            if not self.streamable:  # rare: Fortran order or an unusual header, load whole
                with np.load(self.path, allow_pickle=False) as data:
                    arr = data[self.key]
                for i in range(0, n, batch_size):
                    yield self._rgb(np.ascontiguousarray(arr[i:i + batch_size]))
                return
            with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
                _read_header(f)
                for i in range(0, n, batch_size):
                    b = min(batch_size, n - i)
                    data = f.read(b * per_image)
                    if len(data) != b * per_image:
                        raise DitasError(f"{self.path}: '{self.key}' is truncated (image {i + len(data) // per_image} "
                                         f"of {n} is incomplete)")
                    yield self._rgb(np.frombuffer(data, dtype=np.uint8).reshape(b, h, w, c))
        except DitasError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise DitasError(f"{self.path}: corrupted data in '{self.key}' ({exc})") from None

    @staticmethod
    def _rgb(batch: np.ndarray) -> np.ndarray:
        return np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch

    def small_array(self, key: str) -> np.ndarray | None:
        """Another array of the file (labels, ADM statistics), or None if absent."""
        if key not in self.keys:
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                return data[key]
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise DitasError(f"{self.path}: cannot read '{key}' ({exc})") from None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the file's content for the reference cache: size, mtime and header."""
        st = self.path.stat()
        return {"name": self.path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "shape": list(self.shape)}


def _read_header(f) -> tuple[tuple, bool, np.dtype, bool]:
    """(shape, fortran_order, dtype, streamable) of an .npy stream, left at the start of the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return (*np.lib.format.read_array_header_1_0(f), True)
    if version == (2, 0):
        return (*np.lib.format.read_array_header_2_0(f), True)
    raise ValueError(f"unsupported .npy format version {version}")


# ----------------------------------------------------------------------------------------------
#                                   Statistics and distances
# ----------------------------------------------------------------------------------------------


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set (``np.cov`` convention, N - 1).

    ``factor`` (r x d, ``factor.T @ factor == sigma``) is kept when the set has no more points than
    dimensions: the centred features themselves, a cheaper and exact square root of ``sigma``.
    """

    mu: np.ndarray
    sigma: np.ndarray
    factor: np.ndarray | None = None

    @classmethod
    def of(cls, feats: np.ndarray) -> "GaussianStats":
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or len(feats) < 2:
            raise DitasError(f"statistics need at least 2 feature vectors, got shape {feats.shape}")
        mu = feats.mean(0)
        factor = (feats - mu) / np.sqrt(len(feats) - 1) if len(feats) <= feats.shape[1] else None
        return cls(mu, np.cov(feats, rowvar=False), factor)

    def root(self) -> np.ndarray:
        """A matrix ``F`` with ``F.T @ F == sigma``: the factor, else the symmetric square root."""
        return self.factor if self.factor is not None else _psd_sqrt(self.sigma)


class RunningStats:
    """Streaming mean and covariance (float64 sums), for features too large to keep (sFID's).

    While no more points than dimensions have come, the points are kept too, so that the
    statistics carry their exact low-rank factor (see :class:`GaussianStats`).
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1: np.ndarray | None = None
        self.s2: np.ndarray | None = None
        self.kept: list[np.ndarray] | None = []

    def update(self, feats: np.ndarray) -> None:
        x = np.asarray(feats, dtype=np.float64)
        if self.shift is None:
            self.shift = x[0].copy()  # sums around a sample point: no catastrophic cancellation
            self.s1 = np.zeros(x.shape[1])
            self.s2 = np.zeros((x.shape[1], x.shape[1]))
        if self.kept is not None:
            self.kept.append(x.copy())
        x = x - self.shift
        self.n += len(x)
        self.s1 += x.sum(0)
        self.s2 += x.T @ x
        if self.kept is not None and self.n > x.shape[1]:
            self.kept = None

    def stats(self) -> GaussianStats:
        if self.n < 2:
            raise DitasError(f"statistics need at least 2 feature vectors, got {self.n}")
        if self.kept is not None:
            return GaussianStats.of(np.concatenate(self.kept))
        m = self.s1 / self.n
        sigma = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
        return GaussianStats(m + self.shift, (sigma + sigma.T) / 2)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance; eigenvalues below the numerical rank tolerance are 0."""
    sym = (sigma + sigma.T) / 2
    vals, vecs = np.linalg.eigh(sym)
    tol = max(float(vals.max()), 0.0) * len(vals) * np.finfo(np.float64).eps
    roots = np.sqrt(np.where(vals > tol, vals, 0.0))
    return (vecs * roots) @ vecs.T


def _sum_sqrt_eigvalsh(m: np.ndarray) -> float:
    """Sum of square roots of a symmetric PSD matrix's eigenvalues (those under the rank tolerance are 0)."""
    vals = np.linalg.eigvalsh((m + m.T) / 2)
    tol = max(float(vals.max()), 0.0) * len(vals) * np.finfo(np.float64).eps
    return float(np.sqrt(np.where(vals > tol, vals, 0.0)).sum())


def trace_sqrt_product(a: GaussianStats, b: GaussianStats) -> float:
    """``tr sqrt(S_a S_b)``, the Fréchet distance's cross term, without ``sqrtm``.

    The non-zero eigenvalues of ``S_a S_b`` with ``S_a = F_a^T F_a`` are those of the symmetric
    PSD ``F_a S_b F_a^T``, and with ``S_b = F_b^T F_b`` too they are the squared singular values
    of ``F_b F_a^T``. So: centred features as ``F`` when a set has no more points than dimensions
    (small and exact, also for the rank-deficient covariances where ``sqrtm`` leaves noise), else
    the symmetric square root.
    """
    if a.factor is not None and b.factor is not None:
        return float(np.linalg.svd(b.factor @ a.factor.T, compute_uv=False).sum())
    if b.factor is not None:
        a, b = b, a
    f_a = a.factor if a.factor is not None else _psd_sqrt(a.sigma)
    return _sum_sqrt_eigvalsh(f_a @ b.sigma @ f_a.T)


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b)`` (FID, sFID), as ADM's
    ``FIDStatistics.frechet_distance``; see :func:`trace_sqrt_product` for the cross term."""
    mu_a, mu_b = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s_a, s_b = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu_a.shape != mu_b.shape or s_a.shape != s_b.shape or s_a.shape != (len(mu_a), len(mu_a)):
        raise DitasError(f"statistics do not match: mean {mu_a.shape} vs {mu_b.shape}, "
                         f"covariance {s_a.shape} vs {s_b.shape}")
    if not (np.isfinite(mu_a).all() and np.isfinite(mu_b).all() and np.isfinite(s_a).all() and np.isfinite(s_b).all()):
        raise DitasError("statistics contain NaN or inf")
    diff = mu_a - mu_b
    tr_covmean = trace_sqrt_product(GaussianStats(mu_a, s_a, a.factor), GaussianStats(mu_b, s_b, b.factor))
    value = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_covmean)
    return max(value, 0.0)


def _sq_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (rows of x) x (rows of y), as ADM's distance block."""
    d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ y.T) + (y * y).sum(1)[None, :]
    return d.clamp_min_(0.0)


def manifold_radii(feats: torch.Tensor, k: int = PR_NEIGHBOURS, block: int = 2048) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour in the set (itself the 0th)."""
    n = len(feats)
    if n <= k:
        raise DitasError(f"precision/recall with k={k} needs more than {k} feature vectors, got {n}")
    radii = torch.empty(n, dtype=feats.dtype, device=feats.device)
    for i in range(0, n, block):
        radii[i:i + block] = _sq_distances(feats[i:i + block], feats).kthvalue(k + 1, dim=1).values
    return radii


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURS, block: int = 2048,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """ADM's ``compute_prec_recall``: (fraction of samples in the reference manifold, fraction of
    reference points in the sample manifold), distances in float64, ``block x block`` at a time."""
    device = torch.device(device)
    r = torch.as_tensor(np.asarray(ref), dtype=torch.float64, device=device)
    s = torch.as_tensor(np.asarray(samples), dtype=torch.float64, device=device)
    if r.ndim != 2 or s.ndim != 2 or r.shape[1] != s.shape[1]:
        raise DitasError(f"feature sets do not match: {tuple(r.shape)} vs {tuple(s.shape)}")
    radii_r, radii_s = manifold_radii(r, k, block), manifold_radii(s, k, block)
    ref_in = torch.zeros(len(r), dtype=torch.bool, device=device)
    sample_in = torch.zeros(len(s), dtype=torch.bool, device=device)
    for i in range(0, len(r), block):
        for j in range(0, len(s), block):
            d = _sq_distances(r[i:i + block], s[j:j + block])
            ref_in[i:i + block] |= (d <= radii_s[None, j:j + block]).any(1)
            sample_in[j:j + block] |= (d <= radii_r[i:i + block, None]).any(0)
    return float(sample_in.double().mean()), float(ref_in.double().mean())


def inception_score(pool: np.ndarray, logits_weight: torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's ``compute_inception_score``: softmax of ``pool @ W^T`` (no bias), mean over splits of
    ``split_size`` of ``exp(mean_x KL(p(y|x) || mean_x p(y|x)))``."""
    logits = torch.as_tensor(np.asarray(pool), dtype=torch.float64) @ logits_weight.double().T
    preds = torch.softmax(logits, dim=1).numpy()
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
#                                Features of a file, the reference cache
# ----------------------------------------------------------------------------------------------


@dataclass
class Activations:
    """What the metrics need from one npz: pool features and both Gaussian statistics."""

    pool: np.ndarray  # (N, 2048) float32
    stats: GaussianStats  # pool_3
    stats_spatial: GaussianStats  # mixed_6/conv[..., :7]
    stats_source: str  # "features" or "npz" (ADM's precomputed mu/sigma/mu_s/sigma_s)


def compute_activations(reader: NpzImages, extractor: Callable, batch_size: int = 50, progress: bool = True,
                        desc: str = "inception") -> Activations:
    pools, spatial = [], RunningStats()
    bar = tqdm(total=len(reader), desc=desc, unit="img", disable=not progress, leave=False)
    for batch in reader.batches(batch_size):
        p, s = extractor(batch)
        pools.append(p.astype(np.float32))
        spatial.update(s)
        bar.update(len(batch))
    bar.close()
    pool = np.concatenate(pools)
    stats, stats_s, source = _npz_stats(reader)
    if stats is None:
        stats, stats_s, source = GaussianStats.of(pool), spatial.stats(), "features"
    return Activations(pool, stats, stats_s, source)


def _npz_stats(reader: NpzImages) -> tuple[GaussianStats | None, GaussianStats | None, str]:
    """ADM's ``read_statistics``: precomputed statistics in the file win over its images."""
    if "mu" not in reader.keys:
        return None, None, "features"
    missing = [k for k in STATS_KEYS if k not in reader.keys]
    if missing:
        raise DitasError(f"{reader.path}: has 'mu' but lacks {', '.join(missing)} (ADM reference batches carry "
                         f"all of {', '.join(STATS_KEYS)})")
    arrays = {k: reader.small_array(k).astype(np.float64) for k in STATS_KEYS}
    return (GaussianStats(arrays["mu"], arrays["sigma"]), GaussianStats(arrays["mu_s"], arrays["sigma_s"]), "npz")


def reference_activations(reader: NpzImages, extractor: Callable, cache: str | Path | None = None,
                          batch_size: int = 50, progress: bool = True, extractor_id: str = "") -> Activations:
    """The reference batch's activations, read from ``cache`` when it was made from the same file.

    The cache is an npz written by ditas (marked with its format name); a stale one (other
    reference file, other extractor) is recomputed and replaced, a foreign file is never touched.
    """
    key = json.dumps({**reader.fingerprint(), "extractor": extractor_id}, sort_keys=True)
    cache = Path(cache) if cache is not None else None
    if cache is not None and cache.exists():
        cached = _read_cache(cache, key)
        if cached is not None:
            return cached
    acts = compute_activations(reader, extractor, batch_size, progress, desc="reference")
    if cache is not None:
        with atomic_file(cache) as tmp:
            with open(tmp, "wb") as f:
                factors = {name: st.factor for name, st in (("factor", acts.stats), ("factor_s", acts.stats_spatial))
                           if st.factor is not None}
                np.savez(f, format=np.array(CACHE_FORMAT), key=np.array(key), pool=acts.pool,
                         mu=acts.stats.mu, sigma=acts.stats.sigma, mu_s=acts.stats_spatial.mu,
                         sigma_s=acts.stats_spatial.sigma, stats_source=np.array(acts.stats_source), **factors)
    return acts


def _read_cache(cache: Path, key: str) -> Activations | None:
    if cache.is_dir():
        raise DitasError(f"reference cache {cache}: is a folder")
    try:
        with np.load(cache, allow_pickle=False) as data:
            if "format" not in data.files or str(data["format"]) != CACHE_FORMAT:
                raise DitasError(f"reference cache {cache}: exists and is not a ditas reference cache; "
                                 "choose another path (ditas does not overwrite files it did not write)")
            if str(data["key"]) != key:
                return None  # ours, but made from another reference file or extractor: recompute
            def factor(name: str) -> np.ndarray | None:
                return data[name] if name in data.files else None

            return Activations(data["pool"], GaussianStats(data["mu"], data["sigma"], factor("factor")),
                               GaussianStats(data["mu_s"], data["sigma_s"], factor("factor_s")),
                               str(data["stats_source"]))
    except DitasError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError):
        raise DitasError(f"reference cache {cache}: exists and is not a readable ditas reference cache; "
                         "choose another path") from None


def extractor_id(path: Path) -> str:
    """Identity of the Inception file for the cache key (name, size, digest of the first MiB)."""
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    return f"{path.name}:{path.stat().st_size}:{head}"


# ----------------------------------------------------------------------------------------------
#                                          The evaluation
# ----------------------------------------------------------------------------------------------


def evaluate(samples: NpzImages, ref: NpzImages, extractor: Callable, logits_weight: torch.Tensor | None = None,
             ref_cache: str | Path | None = None, batch_size: int = 50, device: str = "cpu",
             progress: bool = True, extractor_name: str = "") -> dict[str, Any]:
    """All five ADM metrics of ``samples`` against ``ref``; ``is`` is None without ``logits_weight``."""
    t0 = time.perf_counter()
    ref_acts = reference_activations(ref, extractor, ref_cache, batch_size, progress, extractor_name)
    t1 = time.perf_counter()
    acts = compute_activations(samples, extractor, batch_size, progress, desc="samples")
    t2 = time.perf_counter()
    precision, recall = precision_recall(ref_acts.pool, acts.pool, device=device)
    out: dict[str, Any] = {
        "fid": frechet_distance(acts.stats, ref_acts.stats),
        "sfid": frechet_distance(acts.stats_spatial, ref_acts.stats_spatial),
        "is": inception_score(acts.pool, logits_weight) if logits_weight is not None else None,
        "precision": precision,
        "recall": recall,
        "num_samples": len(samples),
        "num_ref": len(ref),
    }
    if logits_weight is None:
        out["is_note"] = ("not computed: the Inception Score needs the 1008-class head, which the offline "
                          "network lacks; give --inception PATH (pytorch-fid's pt_inception-2015-12-05 state dict)")
    labels = samples.small_array("labels")
    out.update({
        "domain": "inception",
        "k": PR_NEIGHBOURS,
        "is_split_size": IS_SPLIT_SIZE,
        "samples_file": str(samples.path),
        "ref_file": str(ref.path),
        "ref_stats_source": ref_acts.stats_source,
        "sample_labels": labels is not None,
        "feature_extractor": extractor_name,
        "time_s": {"reference": round(t1 - t0, 1), "samples": round(t2 - t1, 1),
                   "metrics": round(time.perf_counter() - t2, 1)},
    })
    return out
