"""Training: the loss falls on real digits, runs are reproducible, checkpoints load with load_dit."""

from __future__ import annotations

import json

import pytest
import torch

from ditas.cli.main import main
from ditas.data.digits import load_digits
from ditas.errors import ConfigError
from ditas.model.dit import DiTConfig
from ditas.loaders import load_dit
from ditas.training import TrainConfig, lr_at, train_dit

TINY = dict(input_size=32, patch_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2,
            num_classes=10, learn_sigma=True, class_dropout_prob=0.1)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits("train").tensors()
    return x[:1024], y[:1024]


def _cfg(**kw) -> TrainConfig:
    base = dict(model=DiTConfig(**TINY), steps=120, batch_size=32, lr=2e-3, warmup_steps=5,
                log_every=20, ckpt_every=1000, seed=3, bf16=False)
    base.update(kw)
    return TrainConfig(**base)


def _log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_loss_falls_and_checkpoints_round_trip(digits, tmp_path):
    cfg = _cfg(ckpt_every=80)
    summary = train_dit(cfg, *digits, tmp_path, progress=False)
    log = _log(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in log] == [20, 40, 60, 80, 100, 120]
    # epsilon MSE starts near 1 (an untrained adaLN-zero DiT predicts 0) and must drop clearly
    assert log[0]["mse"] > 0.8
    assert log[-1]["mse"] < 0.75 * log[0]["mse"]
    assert all(r["vb"] >= 0 for r in log)
    assert summary["steps"] == 120 and summary["final_logged_loss"] == log[-1]["loss"]

    ema, raw = load_dit(tmp_path / "ema"), load_dit(tmp_path / "raw")
    assert ema.config == cfg.model and raw.config == cfg.model
    meta = json.loads((tmp_path / "ema" / "config.json").read_text())
    assert meta["training"]["steps_done"] == 120
    # the EMA lags behind the raw weights but is no longer the (zero) adaLN-zero init
    w_ema = ema.final_layer.linear.weight
    w_raw = raw.final_layer.linear.weight
    assert w_ema.abs().sum() > 0 and not torch.equal(w_ema, w_raw)
    # the shipped EMA model is a working denoiser: it predicts noise better than zero does
    torch.manual_seed(0)
    x0, y = digits[0][:64], digits[1][:64]
    noise = torch.randn_like(x0)
    t = torch.full((64,), 500)
    from ditas.diffusion.gaussian import create_diffusion
    xt = create_diffusion(1000).q_sample(x0, t, noise)
    with torch.no_grad():
        eps = raw(xt, t, y)[:, :1]
    assert ((eps - noise) ** 2).mean() < 0.8 * (noise ** 2).mean()


def test_same_seed_same_run(digits, tmp_path):
    a = train_dit(_cfg(steps=10, log_every=5), *digits, tmp_path / "a", progress=False)
    b = train_dit(_cfg(steps=10, log_every=5), *digits, tmp_path / "b", progress=False)
    la, lb = _log(tmp_path / "a" / "train_log.jsonl"), _log(tmp_path / "b" / "train_log.jsonl")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    sa = load_dit(tmp_path / "a" / "ema").state_dict()
    sb = load_dit(tmp_path / "b" / "ema").state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = train_dit(_cfg(steps=10, log_every=5, seed=4), *digits, tmp_path / "c", progress=False)
    assert c["final_logged_loss"] != a["final_logged_loss"]


def test_lr_schedule_warmup_then_cosine():
    cfg = _cfg(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 99) == pytest.approx(1e-4, rel=0.01)
    values = [lr_at(cfg, s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=-1), dict(lr=0.0), dict(ema_decay=1.0),
                                 dict(warmup_steps=-1), dict(min_lr_ratio=2.0)])
def test_bad_training_config(bad):
    with pytest.raises(ConfigError):
        _cfg(**bad)


def test_data_must_match_the_model(digits, tmp_path):
    x, y = digits
    with pytest.raises(ConfigError, match="expects"):
        train_dit(_cfg(), x[:, :, :16, :16], y, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="labels"):
        train_dit(_cfg(), x, y + 10, tmp_path, progress=False)


def test_cli_train_writes_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--out", str(out), "--steps", "4", "--batch-size", "8", "--patch-size", "8",
               "--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--log-every", "2",
               "--no-bf16", "--no-progress"])
    assert rc == 0
    model = load_dit(out / "ema")
    assert model.config.depth == 1 and model.config.in_channels == 1 and model.config.num_classes == 10
    assert len(_log(out / "train_log.jsonl")) == 2
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert "model written to" in capsys.readouterr().out


def test_cli_train_bad_arguments(tmp_path, capsys):
    rc = main(["train", "--out", str(tmp_path / "x"), "--steps", "0", "--no-progress"])
    assert rc == 2
    assert "steps must be a positive integer" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    rc = main(["train", "--out", str(tmp_path / "file"), "--steps", "1", "--no-progress"])
    assert rc == 2
    assert "not a folder" in capsys.readouterr().err


def test_init_continues_from_an_earlier_run(digits, tmp_path):
    train_dit(_cfg(steps=10, log_every=5), *digits, tmp_path / "a", progress=False)
    train_dit(_cfg(steps=1, log_every=1, lr=1e-12, warmup_steps=0), *digits, tmp_path / "b", progress=False,
              init=tmp_path / "a")
    old, new = load_dit(tmp_path / "a" / "raw").state_dict(), load_dit(tmp_path / "b" / "raw").state_dict()
    assert all(torch.allclose(old[k], new[k], atol=1e-6) for k in old)
    other = DiTConfig(**{**TINY, "depth": 1})
    with pytest.raises(ConfigError, match="differs"):
        train_dit(_cfg(model=other, steps=1), *digits, tmp_path / "c", progress=False, init=tmp_path / "a")


def test_init_from_one_model_folder_starts_model_and_ema(digits, tmp_path):
    """``init`` = a model folder (``a/raw``): both the model and its EMA start from it, so with a
    zero learning rate and EMA decay 0.5 both outputs equal it; a folder of neither kind is refused."""
    train_dit(_cfg(steps=10, log_every=5), *digits, tmp_path / "a", progress=False)
    train_dit(_cfg(steps=1, log_every=1, lr=1e-12, warmup_steps=0, ema_decay=0.5), *digits, tmp_path / "b",
              progress=False, init=tmp_path / "a" / "raw")
    start = load_dit(tmp_path / "a" / "raw").state_dict()
    assert load_dit(tmp_path / "a" / "ema").state_dict().keys() == start.keys()
    assert not all(torch.equal(start[k], v) for k, v in load_dit(tmp_path / "a" / "ema").state_dict().items())
    for part in ("raw", "ema"):
        got = load_dit(tmp_path / "b" / part).state_dict()
        assert all(torch.allclose(start[k], got[k], atol=1e-6) for k in start), part
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a model folder"):
        train_dit(_cfg(steps=1), *digits, tmp_path / "c", progress=False, init=tmp_path / "empty")


@pytest.mark.parametrize("std", [1.0, None])
def test_label_embedding_init(digits, tmp_path, std):
    """``label_init_std`` re-draws the label table (None keeps DiT's 0.02); one step barely moves it."""
    cfg = _cfg(steps=1, label_init_std=std, ema_decay=0.0)
    train_dit(cfg, *digits, tmp_path, progress=False)
    table = load_dit(tmp_path / "raw").y_embedder.embedding_table.weight
    want = 0.02 if std is None else std
    assert table.std().item() == pytest.approx(want, rel=0.25)
    with pytest.raises(ConfigError, match="label_init_std"):
        _cfg(label_init_std=-1.0)
