"""The digit evaluator and the generic metrics: they must tell real digits from corrupted ones."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ditas.cli.main import main
from ditas.data.digits import load_digits
from ditas.diffusion.images import save_npz
from ditas.errors import DitasError
from ditas.evaluation.digits import (evaluate_digit_samples, extract_features, load_classifier, predict,
                                     reference_features)
from ditas.evaluation.metrics import frechet_distance, precision_recall, psnr


# ----------------------------------------------------------------------------------------------
#                                       Generic metrics
# ----------------------------------------------------------------------------------------------


def _with_exact_moments(rng, n, mean, var):
    """n samples whose sample mean and (unbiased) covariance are exactly ``mean`` and diag(var)."""
    x = rng.standard_normal((n, len(mean)))
    x -= x.mean(0)
    chol = np.linalg.cholesky(np.cov(x, rowvar=False))
    x = x @ np.linalg.inv(chol).T  # sample covariance exactly I
    return x * np.sqrt(var) + mean


def test_frechet_identical_sets_is_zero():
    feats = np.random.default_rng(0).standard_normal((200, 16))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_frechet_matches_the_closed_form_for_known_moments():
    rng = np.random.default_rng(1)
    d = 8
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    var_a, var_b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    a = _with_exact_moments(rng, 300, mu_a, var_a)
    b = _with_exact_moments(rng, 250, mu_b, var_b)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-6)


def test_frechet_is_robust_to_singular_covariances():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((20, 64))  # fewer samples than features: rank-deficient covariances
    b = rng.standard_normal((30, 64)) + 1.0
    value = frechet_distance(a, b)
    assert math.isfinite(value) and value > 0
    const = np.ones((10, 4))  # zero covariance
    assert frechet_distance(const, const + 2.0) == pytest.approx(16.0, abs=1e-4)


def test_frechet_bad_inputs():
    with pytest.raises(ValueError, match="widths"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3)))


def test_precision_recall_on_toy_sets():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((100, 2))
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    # on a line of unit-spaced points the k=3 radii are known: 2 inside, 3 at the ends
    line = np.stack([np.arange(100.0), np.zeros(100)], axis=1)
    fake = np.concatenate([line[:50], line[:50] + [1000.0, 0.0]])
    p, r = precision_recall(line, fake, k=3)
    assert p == 0.5  # the 50 far fakes lie outside the real manifold
    assert r == 0.53  # reals 0..49, plus 50..52 within the end radius 3 of fake point 49
    # mode collapse: fakes all at one real point -> precision 1, recall tiny
    collapsed = np.repeat(real[:1], 50, axis=0) + 1e-9 * rng.standard_normal((50, 2))
    p, r = precision_recall(real, collapsed, k=3)
    assert p == 1.0 and r <= 0.05


def test_precision_recall_bad_inputs():
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 2)), k=0)


def test_psnr():
    a = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, np.full_like(a, 255)) == pytest.approx(0.0)  # no uint8 wrap-around
    assert psnr(a, np.full(a.shape, 25.5)) == pytest.approx(20.0)
    assert psnr(np.zeros(10), np.full(10, 0.1), max_val=1.0) == pytest.approx(20.0)
    assert psnr(torch.zeros(3), torch.ones(3), max_val=1.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same shape"):
        psnr(np.zeros(3), np.zeros(4))


# ----------------------------------------------------------------------------------------------
#                                  The digit evaluator
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def real_samples():
    """300 real digits from the classifier's training split, i.e. not in the reference set."""
    train = load_digits("train")
    idx = np.random.default_rng(0).choice(len(train), 300, replace=False)
    return train.rgb()[idx], train.labels[idx]


def test_shipped_classifier_is_accurate_on_held_out_digits(classifier):
    test = load_digits("test")
    assert (predict(classifier, test.rgb()) == test.labels).mean() >= 0.95
    assert extract_features(classifier, test.rgb()[:5]).shape == (5, classifier.config.feature_dim)


def test_evaluator_separates_real_from_corrupted(classifier, real_samples):
    images, labels = real_samples
    rng = np.random.default_rng(1)
    shuffled = images[..., 0].reshape(len(images), -1).copy()
    for row in shuffled:
        rng.shuffle(row)  # same pixel histogram as a digit, no digit structure
    shuffled = np.repeat(shuffled.reshape(images.shape[:3])[..., None], 3, axis=-1)
    noise = rng.integers(0, 256, images.shape, dtype=np.uint8)

    real = evaluate_digit_samples(images, labels, classifier=classifier)
    bad_shuffled = evaluate_digit_samples(shuffled, labels, classifier=classifier)
    bad_noise = evaluate_digit_samples(noise, labels, classifier=classifier)

    assert real["class_accuracy"] >= 0.97
    assert real["precision"] >= 0.7 and real["recall"] >= 0.7
    for bad in (bad_shuffled, bad_noise):
        assert bad["fid"] > 20 * real["fid"]
        assert bad["precision"] <= 0.02 and bad["recall"] <= 0.02
        assert bad["class_accuracy"] <= 0.3
    # wrong labels on real digits: accuracy collapses, the label-free metrics do not change
    wrong = evaluate_digit_samples(images, (labels + 1) % 10, classifier=classifier)
    assert wrong["class_accuracy"] <= 0.05
    assert wrong["fid"] == pytest.approx(real["fid"]) and wrong["precision"] == real["precision"]


def test_reference_is_the_held_out_split(classifier):
    ref = reference_features(classifier, "test")
    test = load_digits("test")
    assert np.array_equal(ref, extract_features(classifier, test.rgb()))
    assert len(reference_features(classifier, "all")) == 5000
    with pytest.raises(DitasError, match="reference split"):
        reference_features(classifier, "train")


def test_evaluator_input_errors(classifier, real_samples):
    images, labels = real_samples
    with pytest.raises(DitasError, match="32x32"):
        evaluate_digit_samples(np.zeros((10, 28, 28, 3), np.uint8), labels[:10], classifier=classifier)
    with pytest.raises(DitasError, match="labels"):
        evaluate_digit_samples(images[:10], labels[:9], classifier=classifier)
    with pytest.raises(DitasError, match="uint8"):
        evaluate_digit_samples(images[:10].astype(np.float32), labels[:10], classifier=classifier)
    with pytest.raises(DitasError, match="0..9"):
        evaluate_digit_samples(images[:10], labels[:10] + 10, classifier=classifier)


def test_cli_eval_writes_json_and_prints_a_table(tmp_path, capsys, real_samples):
    images, labels = real_samples
    npz, out = tmp_path / "s.npz", tmp_path / "m.json"
    save_npz(images[:100], labels[:100], npz)
    assert main(["eval", str(npz), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    direct = evaluate_digit_samples(images[:100], labels[:100])
    assert metrics["class_accuracy"] == direct["class_accuracy"]
    assert metrics["fid"] == pytest.approx(direct["fid"])
    assert metrics["num_samples"] == 100 and "class accuracy" in printed and "domain FID" in printed


def test_cli_eval_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    np.savez(tmp_path / "nolabels.npz", arr_0=np.zeros((5, 32, 32, 3), np.uint8))
    assert main(["eval", str(tmp_path / "nolabels.npz")]) == 2
    assert "has no 'labels' array" in capsys.readouterr().err
    np.savez(tmp_path / "flat.npz", arr_0=np.zeros((5, 32, 32), np.uint8), labels=np.zeros(5, np.int64))
    assert main(["eval", str(tmp_path / "flat.npz")]) == 2
    assert "(N, H, W, 3)" in capsys.readouterr().err
    np.savez(tmp_path / "count.npz", arr_0=np.zeros((5, 32, 32, 3), np.uint8), labels=np.zeros(4, np.int64))
    assert main(["eval", str(tmp_path / "count.npz")]) == 2
    assert "one per image" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert main(["eval", str(tmp_path / "junk.npz")]) == 2
    assert "not a readable .npz" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


# ----------------------------------------------------------------------------------------------
#                               The shipped default model
# ----------------------------------------------------------------------------------------------


def test_default_model_draws_the_requested_classes(classifier):
    """The embedded model draws the digits it is asked for (20 samples, 20 DDIM steps: a quick
    version of docs/default_model.md's 500-sample, 50-step DDPM measurement)."""
    from ditas.diffusion.batches import generate
    from ditas.diffusion.images import decode_to_uint8
    from ditas.loaders import load_dit

    model = load_dit(None)
    assert model.config.in_channels == 1 and model.config.num_classes == 10
    labels = np.arange(20) % 10
    samples = generate(model, labels, steps=20, cfg_scale=4.0, sampler="ddim", seed=0, batch_size=20,
                       progress=False)
    images = decode_to_uint8(model, samples)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert (predict(classifier, images) == labels).mean() >= 0.8


def test_fid_vs_other_measures_distance_to_given_samples(classifier, real_samples):
    """``other``: the Fréchet distance to another sample set in the same features (0 to itself,
    growing with a corruption of the compared samples), while ``fid`` stays against real digits."""
    images, labels = real_samples
    same = evaluate_digit_samples(images, labels, classifier=classifier, other=images)
    assert same["fid_vs_other"] == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(2)
    noisy = np.clip(images.astype(np.int16) + rng.integers(-60, 61, images.shape), 0, 255).astype(np.uint8)
    noisier = np.clip(images.astype(np.int16) + rng.integers(-120, 121, images.shape), 0, 255).astype(np.uint8)
    a = evaluate_digit_samples(noisy, labels, classifier=classifier, other=images)
    b = evaluate_digit_samples(noisier, labels, classifier=classifier, other=images)
    assert 0 < a["fid_vs_other"] < b["fid_vs_other"]
    assert a["fid"] == pytest.approx(evaluate_digit_samples(noisy, labels, classifier=classifier)["fid"])
    assert "fid_vs_other" not in evaluate_digit_samples(images, labels, classifier=classifier)
