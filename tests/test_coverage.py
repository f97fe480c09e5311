"""Coverage, measured (``benchmarks/coverage.py``): a tiny model of a diffusers transformer class is
recorded, quantized W4A8 through the generic adapter with ``ditas`` and ``rtn``, runs with the
float model's output shapes and dtypes, saves and loads bit-exactly, and ditas' error on held-out
inputs is below rtn's; anything else is a refusal with a one-line reason.

The default suite runs a fixed representative subset (one class per kind of structure); the run
over every class of the installed diffusers (about 4 s a class, 65 classes: over 4 minutes on one
core) is marked ``slow`` (``pytest -m slow tests/test_coverage.py``)."""

from __future__ import annotations

import json

import pytest

from benchmark_modules import load_benchmark

cov = load_benchmark("coverage", "ditas_coverage")

# one class per kind of structure: class-conditional adaLN-zero DiT, cross-attention with a shared
# adaLN-single (PixArt), joint text/image blocks (SD3), double + single stream stacks (Flux),
# a video DiT with cross-attention and per-block tables (Wan), linear attention (Sana), an
# audio+video model with two outputs (LTX-2), a model taking lists of samples (Z-Image)
REPRESENTATIVE = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                  "FluxTransformer2DModel", "WanTransformer3DModel", "SanaTransformer2DModel",
                  "LTX2VideoTransformer3DModel", "ZImageTransformer2DModel")


def _assert_row_is_honest(row):
    """A row either works (both errors measured, ditas' below) or says why not in one line."""
    if row["status"] == "works":
        assert 0 <= row["ditas"] < row["rtn"] and "reason" not in row
    else:
        assert row["status"] == "refused" and row["reason"] and "\n" not in row["reason"]
        assert "Traceback" not in row["reason"]


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_representative_classes_quantize_and_beat_rtn(name, tmp_path):
    row = cov.check_class(name, tmp_path)
    _assert_row_is_honest(row)
    assert row["status"] == "works", row.get("reason")
    assert row["adapter"] == "generic" and row["quantized_linears"] > 0 and row["blocks"] >= 2


@pytest.mark.slow
def test_every_transformer_class_works_or_is_refused_in_one_line(tmp_path):
    zoo = cov.load_zoo()
    rows = cov.run(zoo.installed_classes(), log=lambda line: None)
    assert [r["class"] for r in rows] == zoo.installed_classes()
    for row in rows:
        _assert_row_is_honest(row)
    works = sum(r["status"] == "works" for r in rows)
    assert works >= 55, [(r["class"], r["reason"]) for r in rows if r["status"] != "works"]


def test_a_failure_becomes_a_one_line_reason(monkeypatch, tmp_path):
    import ditas

    def broken(*args, **kwargs):
        raise RuntimeError("first line\nsecond line\n  File 'x.py', line 3")

    monkeypatch.setattr(ditas, "quantize_", broken)
    row = cov.check_class("DiTTransformer2DModel", tmp_path)
    assert row["status"] == "refused"
    assert row["reason"] == "ditas quantize: RuntimeError: first line"
    assert cov.check_class("NoSuchTransformer2DModel")["reason"] == "not in the zoo"


def test_the_table_is_regenerated_between_the_markers(tmp_path):
    doc = tmp_path / "families.md"
    doc.write_text(f"# head\n\n{cov.BEGIN}\nold table\n{cov.END}\n\ntail\n")
    data = tmp_path / "coverage.json"
    rows = [{"class": "WanTransformer3DModel", "status": "works", "ditas": 0.01, "rtn": 0.05},
            {"class": "FluxTransformer2DModel", "status": "refused", "reason": "ditas run: Error: a | b"}]
    cov.write(rows, data, doc)
    text = doc.read_text()
    assert text.startswith("# head\n") and text.endswith("\n\ntail\n") and "old table" not in text
    assert "**1 of 2**" in text and "| `WanTransformer3DModel` | works | 0.0100 | 0.0500 | 0.20 |  |" in text
    assert "ditas run: Error: a / b" in text  # a pipe would break the table
    saved = json.loads(data.read_text())
    assert saved["works"] == 1 and saved["total"] == 2
    # a subset run replaces its rows and keeps the others
    cov.write([{"class": "FluxTransformer2DModel", "status": "works", "ditas": 0.1, "rtn": 0.2}], data, doc)
    assert json.loads(data.read_text())["works"] == 2 and "**2 of 2**" in doc.read_text()
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        cov.write(rows, data, doc)
