"""Coverage, measured: which transformer classes of the installed diffusers ditas quantizes.

For every class of ``benchmarks/diffusers_zoo.py`` (one tiny random model per transformer class
of diffusers), ``check_class``:

1. builds the model and computes its float outputs on held-out inputs (seeds ``EVAL_SEEDS``);
2. for each recipe (W4A8 ``ditas`` and ``rtn``, both through the generic adapter): copies the
   model, records a calibration with ``ditas.record_calibration`` around a few forward calls
   (seeds ``CALIB_SEEDS``: other inputs and timesteps), quantizes the copy with ``quantize_``;
3. checks that the quantized model runs on the held-out inputs with the float model's output
   shapes and dtypes, that ``save_quantized`` -> ``load_quantized`` gives bit-identical outputs
   on them, and measures its output error against float (relative MSE over every output tensor);
4. says ``works`` when all of it holds and ditas' error is below rtn's, ``refused`` otherwise,
   with a one-line reason (an exception becomes ``stage: ErrorType: first line``, never a
   traceback).

``python benchmarks/coverage.py`` runs every class, writes ``docs/coverage.json`` and regenerates
the table in ``docs/families.md`` between the ``coverage`` markers. ``--classes A,B`` runs a
subset and replaces those rows of the existing JSON (the rest are kept, then the table is
regenerated from it); ``--no-write`` only prints.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "coverage.json"
DOC_PATH = ROOT / "docs" / "families.md"
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"
CALIB_SEEDS = (0, 1, 2, 3)
EVAL_SEEDS = (1000, 1001)
RECIPES = ("ditas", "rtn")
# W4A8; the generic adapter even where a hand-written one exists; LoRA rank 4 x 2 rounds for ditas
# (the tiny models are 16 to 48 channels wide: the default rank 32 would be the full width)
SETTINGS: dict[str, dict[str, Any]] = {
    "ditas": dict(w_bits=4, a_bits=8, adapter="generic", lora_rank=4, lora_rounds=2),
    "rtn": dict(w_bits=4, a_bits=8, adapter="generic"),
}


def load_zoo():
    """``benchmarks/diffusers_zoo.py`` as a module (the benchmarks folder is not a package)."""
    if "diffusers_zoo" in sys.modules:
        return sys.modules["diffusers_zoo"]
    spec = importlib.util.spec_from_file_location("diffusers_zoo", Path(__file__).with_name("diffusers_zoo.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["diffusers_zoo"] = mod
    spec.loader.exec_module(mod)
    return mod


def one_line(stage: str, exc: BaseException) -> str:
    """An exception as one short line: where, what type, the first line of its message."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{stage}: {type(exc).__name__}: {msg}"[:240]


def _outputs(zoo, model, name: str, seeds) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [zoo.output_tensors(model(**zoo.inputs(name, s))) for s in seeds]


def rel_mse(outs: list[list[torch.Tensor]], refs: list[list[torch.Tensor]]) -> float:
    """Squared error of every output tensor over all inputs, relative to the float outputs' energy."""
    num = sum(float((o.double() - r.double()).pow(2).sum()) for os_, rs in zip(outs, refs) for o, r in zip(os_, rs))
    den = sum(float(r.double().pow(2).sum()) for rs in refs for r in rs)
    return num / max(den, 1e-30)


def _same_layout(outs, refs) -> str | None:
    """None when ``outs`` has the float outputs' count, shapes and dtypes; else what differs."""
    for os_, rs in zip(outs, refs):
        if len(os_) != len(rs):
            return f"{len(os_)} output tensors instead of {len(rs)}"
        for o, r in zip(os_, rs):
            if o.shape != r.shape or o.dtype != r.dtype:
                return f"output {tuple(o.shape)} {o.dtype} instead of {tuple(r.shape)} {r.dtype}"
            if not torch.isfinite(o).all():
                return "non-finite output"
    return None


def check_recipe(zoo, ditas, model, name: str, recipe: str, refs, folder: Path) -> dict[str, Any]:
    """One recipe on one class: quantize a copy, run, compare layout, save/load bit-exactness, error."""
    from ditas.quantization.linear import QuantLinear

    stage = "record"
    try:
        q = copy.deepcopy(model)  # each recipe quantizes its own copy, recorded on CALIB_SEEDS
        with ditas.record_calibration(q) as calib, torch.no_grad():
            for s in CALIB_SEEDS:
                q(**zoo.inputs(name, s))
        stage = "quantize"
        report = ditas.quantize_(q, ditas.recipe_config(recipe, **SETTINGS[recipe]), calib)
        n_quant = sum(isinstance(m, QuantLinear) for m in q.modules())
        if n_quant == 0:
            return {"reason": f"{recipe}: no linear was quantized"}
        stage = "run"
        outs = _outputs(zoo, q, name, EVAL_SEEDS)
        bad = _same_layout(outs, refs)
        if bad:
            return {"reason": f"{recipe}: {bad}"}
        stage = "save"
        ditas.save_quantized(q, folder / recipe)
        stage = "load"
        back = ditas.load_quantized(folder / recipe)
        stage = "run loaded"
        again = _outputs(zoo, back, name, EVAL_SEEDS)
        if not all(torch.equal(a, b) for os_, bs in zip(outs, again) for a, b in zip(os_, bs)):
            return {"reason": f"{recipe}: save/load is not bit-exact"}
    except Exception as exc:  # noqa: BLE001 - any failure is a row of the table, in one line
        return {"reason": one_line(f"{recipe} {stage}", exc)}
    info = report.get("adapter", {}) if isinstance(report, dict) else {}
    blocks = info.get("blocks", {})
    return {"error": rel_mse(outs, refs), "adapter": info.get("name"), "quantized_linears": n_quant,
            "not_quantized": len(info.get("not_quantized", {})), "blocks": len(blocks),
            "replayed": sum(v == "replayed" for v in blocks.values())}


def check_class(name: str, folder: Path | None = None) -> dict[str, Any]:
    """The coverage row of one class (see the module docstring)."""
    import ditas

    zoo = load_zoo()
    t0 = time.perf_counter()
    row: dict[str, Any] = {"class": name, "status": "refused"}
    entry = zoo.ZOO.get(name)
    if entry is None or entry.reason:
        row["reason"] = entry.reason if entry else "not in the zoo"
        return row
    try:
        model = zoo.build(name, seed=0)
        refs = _outputs(zoo, model, name, EVAL_SEEDS)
    except Exception as exc:  # noqa: BLE001
        row["reason"] = one_line("float model", exc)
        return row
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        results = {r: check_recipe(zoo, ditas, model, name, r, refs, Path(tmp)) for r in RECIPES}
    for r, res in results.items():
        if "error" in res:
            row[r] = res["error"]
    for key in ("adapter", "quantized_linears", "not_quantized", "blocks", "replayed"):
        if key in results["ditas"]:
            row[key] = results["ditas"][key]
    reasons = [res["reason"] for res in results.values() if "reason" in res]
    if reasons:
        row["reason"] = reasons[0]
    elif not row["ditas"] < row["rtn"]:
        row["reason"] = f"ditas error {row['ditas']:.3g} is not below rtn's {row['rtn']:.3g}"
    else:
        row["status"] = "works"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _progress(line: str) -> None:
    print(line, flush=True)


def run(classes: list[str], log=_progress) -> list[dict[str, Any]]:
    """The rows of ``classes``, in order, printing one progress line per class."""
    rows = []
    for i, name in enumerate(classes, 1):
        row = check_class(name)
        rows.append(row)
        detail = (f"ditas {row['ditas']:.4g} rtn {row['rtn']:.4g}" if "ditas" in row and "rtn" in row else "")
        log(f"[{i}/{len(classes)}] {name}: {row['status']} {detail} {row.get('reason', '')}".rstrip())
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table (and the count) of ``rows``."""
    works = sum(r["status"] == "works" for r in rows)
    lines = [f"**{works} of {len(rows)}** transformer classes work (W4A8 ditas below rtn on held-out inputs).", "",
             "| class | status | ditas error | rtn error | ditas / rtn | blocks (replayed) | W4A8 linears | reason |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["class"]):
        d, t = r.get("ditas"), r.get("rtn")
        ratio = f"{d / t:.2f}" if d is not None and t else ""
        blocks = f"{r['blocks']} ({r['replayed']})" if "blocks" in r else ""
        lines.append(f"| `{r['class']}` | {r['status']} | {'' if d is None else f'{d:.4f}'} | "
                     f"{'' if t is None else f'{t:.4f}'} | {ratio} | {blocks} | {r.get('quantized_linears', '')} | "
                     f"{r.get('reason', '').replace('|', '/')} |")
    return "\n".join(lines)


def write(rows: list[dict[str, Any]], json_path: Path = JSON_PATH, doc_path: Path = DOC_PATH) -> None:
    """Merges ``rows`` into the JSON (by class), then rewrites the table between the markers."""
    import diffusers

    old = json.loads(json_path.read_text())["rows"] if json_path.exists() else []
    by_class = {r["class"]: r for r in old}
    by_class.update({r["class"]: r for r in rows})
    installed = set(load_zoo().installed_classes())
    merged = [by_class[c] for c in sorted(by_class) if c in installed]
    data = {"diffusers": diffusers.__version__, "torch": torch.__version__, "calib_seeds": list(CALIB_SEEDS),
            "eval_seeds": list(EVAL_SEEDS), "settings": SETTINGS, "metric": "relative MSE of all outputs vs float",
            "works": sum(r["status"] == "works" for r in merged), "total": len(merged), "rows": merged}
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    text = doc_path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc_path} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc_path.write_text(f"{head}{BEGIN}\n{table(merged)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", default="", help="comma-separated class names (default: every zoo class)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/ as it is")
    args = p.parse_args(argv)
    zoo = load_zoo()
    classes = [c for c in args.classes.split(",") if c] or zoo.installed_classes()
    unknown = [c for c in classes if c not in zoo.ZOO]
    if unknown:
        p.error(f"not transformer classes of the zoo: {', '.join(unknown)}")
    rows = run(classes)
    works = sum(r["status"] == "works" for r in rows)
    print(f"{works} of {len(rows)} work")
    if not args.no_write:
        write(rows)
        print(f"wrote {JSON_PATH.relative_to(ROOT)} and the table of {DOC_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
