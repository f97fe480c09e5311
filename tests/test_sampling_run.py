"""The one sampling run: sample i's noise depends only on (seed, i); batch size changes nothing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ditas
from ditas.diffusion.batches import generate
from ditas.diffusion.run import SampleNoise, SamplingSettings, eps_mse, eps_trajectory, sample_seed, sampling_run
from ditas.errors import DitasError
from quant_helpers import random_dit


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 40), start=st.integers(0, 10 ** 6), n=st.integers(1, 5), k=st.integers(0, 4))
def test_noise_of_a_sample_depends_only_on_seed_and_index(seed, start, n, k):
    k = min(k, n - 1)
    whole = SampleNoise((2, 3, 3), seed, range(start, start + n))
    alone = SampleNoise((2, 3, 3), seed, [start + k])
    for _ in range(3):  # start noise, then two step noises
        assert torch.equal(whole.step()[k], alone.step()[0])
    assert sample_seed(seed, start) != sample_seed(seed, start + 1)
    assert sample_seed(seed, start) != sample_seed(seed + 1, start)


@pytest.fixture(scope="module")
def default_model():
    return ditas.load_dit()


def test_batch_sizes_give_identical_samples(default_model):
    labels = torch.arange(9) % 10
    runs = [generate(default_model, labels, steps=2, seed=5, batch_size=bs, progress=False) for bs in (1, 7, 64)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    other = generate(default_model, labels[:4], steps=3, seed=6, batch_size=4, progress=False)
    assert not torch.equal(other, runs[0][:4])


def test_a_sample_is_the_same_inside_any_run(default_model):
    """Sample 9 of a 12-sample run equals sample 9 sampled on its own (first_index=9)."""
    labels = torch.arange(12) % 10
    whole = generate(default_model, labels, steps=3, seed=2, batch_size=12, progress=False)
    alone = generate(default_model, labels[9:10], steps=3, seed=2, batch_size=1, progress=False, first_index=9)
    assert torch.equal(whole[9:10], alone)


def test_guided_halves_share_noise_and_unguided_runs():
    m = random_dit(3)
    y = torch.tensor([1, 2, 3])
    for _, x in sampling_run(m, y, SamplingSettings(steps=3, cfg_scale=4.0)):
        assert x.shape[0] == 6 and torch.equal(x[:3], x[3:])
    for _, x in sampling_run(m, y, SamplingSettings(steps=3, cfg_scale=1.0)):
        assert x.shape[0] == 3


def test_eps_metric_is_zero_on_its_own_trajectory_and_positive_elsewhere():
    a, b = random_dit(1), random_dit(2)
    s = SamplingSettings(steps=3, cfg_scale=4.0, seed=1)
    traj = eps_trajectory(a, [1, 2], s)
    assert len(traj) == 3
    assert eps_mse(a, [1, 2], s, traj) == 0.0
    assert eps_mse(b, [1, 2], s, traj) > 0


@pytest.mark.parametrize("kw", [dict(steps=1), dict(sampler="euler"), dict(seed=-1)])
def test_bad_settings(kw):
    with pytest.raises(DitasError):
        SamplingSettings(**kw)
