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
from ..readers import ArraySpec, check_finite, fail, read_npz_arrays, safe_reason, sha256_file

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
CACHE_FORMAT = "ditas-adm-reference-cache-v1"
EVALUATOR_VERSION = "ditas-adm-2"  # part of the cache key: a change of the feature arithmetic invalidates caches
PSD_TOLERANCE = 1e-6  # relative to the largest |entry|: asymmetry and negative eigenvalues beyond rounding
STATS_SPEC = ArraySpec("fiu")


# ----------------------------------------------------------------------------------------------
#                                  Reading npz files in batches
# ----------------------------------------------------------------------------------------------


class NpzImages:
    """The ``arr_0`` uint8 NHWC images of an ADM-style ``.npz``, read in batches (memory: one batch).

    The header is checked on construction (through :mod:`ditas.readers`: dtype, shape, claimed
    bytes against the bytes present), so a wrong file fails before any long work with one line
    naming it. Other small arrays (``labels``, ``mu``, ...) are read with :meth:`small_array`.
    """

    def __init__(self, path: str | Path, key: str = "arr_0", what: str = "npz file"):
        self.path, self.key, self.what = Path(path), key, what
        contents = read_npz_arrays(self.path, what, {key: ArraySpec("u", load=False)})
        self.keys = contents.keys
        self.header = contents.headers[key]
        shape = self.header.shape
        if self.header.dtype != np.uint8:
            raise fail(self.path, what, f"'{key}' has dtype {self.header.dtype}, expected uint8 images in [0, 255]")
        if len(shape) != 4 or shape[-1] not in (1, 3):
            raise fail(self.path, what, f"'{key}' has shape {tuple(shape)}; expected (N, H, W, 3) uint8 images")
        if shape[0] < 1 or shape[1] < 1 or shape[2] < 1:
            raise fail(self.path, what, f"'{key}' holds no images (shape {tuple(shape)})")
        self.shape = shape

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yields (B, H, W, 3) uint8 batches in order (grey images replicated to 3 channels)."""
        n, h, w, c = self.shape
        per_image = h * w * c
        try:
            if self.header.fortran:  # rare: Fortran order, load whole (its size was checked)
                arr = read_npz_arrays(self.path, self.what, {self.key: ArraySpec("u")}).arrays[self.key]
                for i in range(0, n, batch_size):
                    yield self._rgb(np.ascontiguousarray(arr[i:i + batch_size]))
                return
            with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
                f.read(self.header.data_offset)
                for i in range(0, n, batch_size):
                    b = min(batch_size, n - i)
                    data = f.read(b * per_image)
                    if len(data) != b * per_image:
                        raise fail(self.path, self.what, f"'{self.key}' is truncated (image "
                                   f"{i + len(data) // per_image} of {n} is incomplete)")
                    yield self._rgb(np.frombuffer(data, dtype=np.uint8).reshape(b, h, w, c))
        except DitasError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise fail(self.path, self.what, f"corrupted data in '{self.key}' ({safe_reason(exc)})") from None

    @staticmethod
    def _rgb(batch: np.ndarray) -> np.ndarray:
        return np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch

    def small_array(self, key: str, spec: ArraySpec | None = None) -> np.ndarray | None:
        """Another array of the file (labels, ADM statistics), checked against ``spec`` (default:
        any plain numbers), or None if absent."""
        if key not in self.keys:
            return None
        return read_npz_arrays(self.path, self.what, {key: spec or ArraySpec("biuf")}).arrays[key]

    def content_key(self) -> dict[str, Any]:
        """What identifies the file for the reference cache: its content (sha256, streamed) and the
        evaluator's version; a copy with other bytes but the same name, size and mtime differs."""
        return {"sha256": sha256_file(self.path), "shape": list(self.shape), "evaluator": EVALUATOR_VERSION}


def check_stats(mu: np.ndarray, sigma: np.ndarray, path: Path, what: str, names: tuple[str, str]) -> None:
    """A Gaussian's statistics as a file gives them: ``mu`` (d,), ``sigma`` (d, d), both finite,
    ``sigma`` symmetric positive semi-definite within rounding (``-I`` would give FID 0)."""
    d = len(mu)
    if sigma.shape != (d, d):
        raise fail(path, what, f"'{names[1]}' has shape {sigma.shape}, expected ({d}, {d}) to match '{names[0]}'")
    check_finite(((names[0], mu), (names[1], sigma)), path, what)
    scale = max(float(np.abs(sigma).max(initial=0.0)), np.finfo(np.float64).tiny)
    if float(np.abs(sigma - sigma.T).max(initial=0.0)) > PSD_TOLERANCE * scale:
        raise fail(path, what, f"'{names[1]}' is not symmetric; not a covariance matrix")
    low = float(np.linalg.eigvalsh((sigma + sigma.T) / 2).min(initial=0.0)) if d else 0.0
    if low < -PSD_TOLERANCE * scale:
        raise fail(path, what, f"'{names[1]}' has a negative eigenvalue ({low:.3g}); not a covariance matrix")


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
    stats, stats_s, source = _npz_stats(reader)  # checked before the long work
    pools, spatial = [], RunningStats()
    bar = tqdm(total=len(reader), desc=desc, unit="img", disable=not progress, leave=False)
    for batch in reader.batches(batch_size):
        p, s = extractor(batch)
        pools.append(p.astype(np.float32))
        spatial.update(s)
        bar.update(len(batch))
    bar.close()
    pool = np.concatenate(pools)
    if stats is None:
        stats, stats_s, source = GaussianStats.of(pool), spatial.stats(), "features"
    return Activations(pool, stats, stats_s, source)


def _npz_stats(reader: NpzImages) -> tuple[GaussianStats | None, GaussianStats | None, str]:
    """ADM's ``read_statistics``: precomputed statistics in the file win over its images (checked:
    float vectors and matrices of matching shapes, finite, ``sigma`` symmetric PSD)."""
    if "mu" not in reader.keys:
        return None, None, "features"
    missing = [k for k in STATS_KEYS if k not in reader.keys]
    if missing:
        raise fail(reader.path, reader.what, f"has 'mu' but lacks {', '.join(missing)} (ADM reference batches "
                   f"carry all of {', '.join(STATS_KEYS)})")
    specs = {"mu": ArraySpec("f", (None,)), "sigma": ArraySpec("f", (None, None)),
             "mu_s": ArraySpec("f", (None,)), "sigma_s": ArraySpec("f", (None, None))}
    arrays = {k: v.astype(np.float64) for k, v in read_npz_arrays(reader.path, reader.what, specs).arrays.items()}
    check_stats(arrays["mu"], arrays["sigma"], reader.path, reader.what, ("mu", "sigma"))
    check_stats(arrays["mu_s"], arrays["sigma_s"], reader.path, reader.what, ("mu_s", "sigma_s"))
    return (GaussianStats(arrays["mu"], arrays["sigma"]), GaussianStats(arrays["mu_s"], arrays["sigma_s"]), "npz")


def reference_activations(reader: NpzImages, extractor: Callable, cache: str | Path | None = None,
                          batch_size: int = 50, progress: bool = True, extractor_id: str = "") -> Activations:
    """The reference batch's activations, read from ``cache`` when it was made from the same file.

    The cache is an npz written by ditas (marked with its format name), keyed on the reference's
    content (sha256), the evaluator's version and the extractor; a stale one is recomputed and
    replaced, a foreign file is never touched, a corrupted one is an error.
    """
    cache = Path(cache) if cache is not None else None
    key = json.dumps({**reader.content_key(), "extractor": extractor_id}, sort_keys=True) if cache else ""
    if cache is not None and (cache.exists() or cache.is_symlink()):
        cached = _read_cache(cache, key, len(reader))
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


_CACHE_TEXT = {"format": ArraySpec("U", (), required=False), "key": ArraySpec("U", (), required=False)}
_CACHE_ARRAYS = {
    "pool": ArraySpec("f", (None, None), finite=True), "mu": ArraySpec("f", (None,)),
    "sigma": ArraySpec("f", (None, None)), "mu_s": ArraySpec("f", (None,)), "sigma_s": ArraySpec("f", (None, None)),
    "factor": ArraySpec("f", (None, None), required=False, finite=True),
    "factor_s": ArraySpec("f", (None, None), required=False, finite=True),
    "stats_source": ArraySpec("U", ())}


def _read_cache(cache: Path, key: str, num_ref: int) -> Activations | None:
    """The cached activations; None when the cache is ours but of another reference or extractor.
    Every array is checked (types, shapes, finite, covariances PSD): a bad one is an error."""
    what = "reference cache"
    text = read_npz_arrays(cache, what, _CACHE_TEXT).arrays
    if "format" not in text or str(text["format"]) != CACHE_FORMAT:
        raise fail(cache, what, "exists and is not a ditas reference cache; choose another path (ditas does not "
                   "overwrite files it did not write)")
    if "key" not in text:
        raise fail(cache, what, "has no 'key'; remove it to recompute")
    if str(text["key"]) != key:
        return None  # ours, but made from another reference file, evaluator or extractor: recompute
    a = read_npz_arrays(cache, what, _CACHE_ARRAYS).arrays
    d = a["pool"].shape[1]
    if a["pool"].shape[0] != num_ref or len(a["mu"]) != d:
        raise fail(cache, what, f"'pool' has shape {a['pool'].shape} and 'mu' {a['mu'].shape}, expected "
                   f"({num_ref}, d) and (d,) for this reference; remove it to recompute")
    check_stats(a["mu"], a["sigma"], cache, what, ("mu", "sigma"))
    check_stats(a["mu_s"], a["sigma_s"], cache, what, ("mu_s", "sigma_s"))
    for name, mu in (("factor", a["mu"]), ("factor_s", a["mu_s"])):
        if name in a and a[name].shape[1] != len(mu):
            raise fail(cache, what, f"'{name}' has shape {a[name].shape}, expected (r, {len(mu)})")
    if str(a["stats_source"]) not in ("features", "npz"):
        raise fail(cache, what, f"'stats_source' is {str(a['stats_source'])[:40]!r}, expected features or npz")
    return Activations(a["pool"], GaussianStats(a["mu"], a["sigma"], a.get("factor")),
                       GaussianStats(a["mu_s"], a["sigma_s"], a.get("factor_s")), str(a["stats_source"]))


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
    labels = samples.small_array("labels", ArraySpec("iu", (len(samples),)))
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
