"""Coverage, measured (``benchmarks/coverage.py``): every transformer class of the installed
diffusers, as a tiny model of ``benchmarks/diffusers_zoo.py``, is recorded, quantized W4A8
through the generic adapter with ``ditas`` and ``rtn``, runs with the float model's output shapes
and dtypes, saves and loads bit-exactly, and ditas' error on held-out inputs is below rtn's;
anything else would be a refusal with a one-line reason.

The whole run (65 classes) takes about 80 s of one core (measured: 80 s user time, 5.5 min wall
on the shared, loaded 2-core machine), so it is in the default suite, one test item per class.
"""

from __future__ import annotations

import json

import pytest

from benchmark_modules import load_benchmark

cov = load_benchmark("coverage", "ditas_coverage")
zoo = cov.load_zoo()


class _Rows(dict):
    """The coverage rows, each computed on first use (a ``-k`` selection runs only its classes)."""

    def __missing__(self, name):
        self[name] = cov.check_class(name)
        return self[name]


@pytest.fixture(scope="module")
def rows():
    return _Rows()


def _assert_row_is_honest(row):
    """A row either works (both errors measured, ditas' below) or says why not in one line."""
    if row["status"] == "works":
        assert 0 <= row["ditas"] < row["rtn"] and "reason" not in row
    else:
        assert row["status"] == "refused" and row["reason"] and "\n" not in row["reason"]
        assert "Traceback" not in row["reason"]


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_the_generic_adapter_quantizes_the_class_better_than_rtn(rows, name):
    row = rows[name]
    _assert_row_is_honest(row)
    assert row["status"] == "works", row.get("reason")
    assert row["adapter"] == "generic" and row["quantized_linears"] > 0 and row["blocks"] >= 2


def test_at_least_55_of_the_installed_transformer_classes_work(rows):
    names = zoo.installed_classes()
    works = [n for n in names if rows[n]["status"] == "works"]
    assert len(works) >= 55, [(n, rows[n].get("reason")) for n in names if n not in works]


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
