"""The model seam: adapters describe the model; checkpoints record the family; old folders load."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditas.errors import ConfigError
from ditas.model.adapters.base import Fold
from ditas.model.adapters.registry import adapter_for
from ditas.loaders import load_dit
from ditas.quantization.checkpoint import load_quantized, quant_layers
from quant_helpers import assert_close_to_recorded, random_dit

DATA = Path(__file__).resolve().parent / "data"
SRC = Path(__file__).resolve().parents[1] / "src" / "ditas"


def test_dit_adapter_describes_every_block_and_fold():
    m = random_dit(0, depth=3)
    a = adapter_for(m)
    assert a.family == "dit"
    blocks = a.blocks()
    assert [b.name for b in blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    d = m.config.hidden_size
    for b in blocks:
        kinds = {g.role: g.fold.kind for g in b.groups}
        assert kinds == {"qkv": "adaln_rows", "fc1": "adaln_rows", "proj": "prev_rows", "fc2": "on_the_fly"}
        proj = next(g for g in b.groups if g.role == "proj")
        assert proj.fold.target == f"{b.name}.attn.qkv" and proj.fold.rows == (2 * d, 3 * d)
        # proj's factor folds into qkv: proj must be searched first
        assert [g.role for g in b.groups].index("proj") < [g.role for g in b.groups].index("qkv")
        for lin in b.linears:
            assert isinstance(m.get_submodule(lin.name), torch.nn.Linear)
    assert a.weight_only_linears()[-1] == "final_layer.adaLN_modulation.1"
    assert len(a.weight_only_linears()) == 4


def test_unknown_model_falls_back_to_the_generic_adapter_which_asks_for_a_recorded_call():
    a = adapter_for(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert a.family == "generic"
    with pytest.raises(ConfigError, match="no adapter for a Sequential: the generic adapter needs a recorded call"):
        a.blocks()


def test_fold_spec_is_validated():
    with pytest.raises(ValueError, match="fold kind"):
        Fold("somewhere", "x")
    with pytest.raises(ValueError, match="needs a target"):
        Fold("adaln_rows", num_chunks=6, shift_chunk=0, scale_chunk=1)
    with pytest.raises(ValueError, match="chunks"):
        Fold("adaln_rows", "x", num_chunks=2, shift_chunk=0, scale_chunk=2)


@pytest.mark.exactness
@pytest.mark.parametrize("backend", ["fake", "int"])
def test_folder_written_before_families_still_loads_and_computes_the_same(backend, tmp_path):
    """tests/data/legacy_quantized_v1 was saved by the code before the seam (see its script): it
    loads with the same integer codes, computes the recorded outputs up to float rounding (they
    were recorded on another CPU), and saved again in today's format it computes bit for bit what
    it computes itself."""
    from ditas.quantization.checkpoint import save_quantized

    folder = DATA / "legacy_quantized_v1"
    assert "family" not in (folder / "config.json").read_text()
    ref = load_file(str(DATA / f"legacy_quantized_v1_{backend}.safetensors"))
    q = load_dit(folder, kernel={"fake": "simulated", "int": "auto"}[backend])  # the data files' names
    assert q.quant_family == "dit"
    from ditas.quantization.recipes import recipe_config  # the flat config it was saved with reads back
    assert q.quant_config == recipe_config("ditas", steps=2, calib_labels=2, lora_rank=4, lora_rounds=2,
                                           alpha_grid=(0.3, 0.7), lora_dtype="float32")  # fp32 factors then
    resaved = save_quantized(q, tmp_path / "resaved", q.quant_config)
    old, new = load_file(str(folder / "model.safetensors")), load_file(str(resaved / "model.safetensors"))
    codes = [k for k in old if k.endswith(".qweight")]
    assert codes and all(torch.equal(new[k], old[k]) for k in codes)  # the packed integer codes
    again = load_dit(resaved, kernel={"fake": "simulated", "int": "auto"}[backend])
    with torch.no_grad():
        torch.manual_seed(0)
        out = q(ref["x"], ref["t"], ref["y"])
        assert torch.equal(again(ref["x"], ref["t"], ref["y"]), out)  # two computations of this run
        if backend == "int":
            # the LoRA down-projection now runs inside the integer product (3 int8 limbs per row):
            # the same function up to float rounding; the route of the reference run is that of the recording
            assert float((out - ref["out"]).norm() / ref["out"].norm()) < 2e-6
            from ditas.quantization.kernels import use_kernels

            use_kernels(q, "auto", lora_limbs=0)
            out = q(ref["x"], ref["t"], ref["y"])
    assert_close_to_recorded(out, ref["out"])


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The ditas modules ``path`` imports, at module level or inside functions (relative imports resolved)."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.update(f"{module}.{a.name}" for a in node.names)
            names.add(module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    known = {_module_name(f) for f in SRC.rglob("*.py")}
    return {n for n in names if n in known} - {_module_name(path)}


def test_the_model_layer_never_imports_the_algorithms():
    """model/ and diffusion/ describe and run models; quantization/ and calibration/ act on them,
    one layer up: no import climbs back (ditas.loaders picks float or quantized readers)."""
    climbs = [(f.name, n) for layer in ("model", "diffusion") for f in (SRC / layer).rglob("*.py")
              for n in _imports(f) if n.startswith(("ditas.quantization", "ditas.calibration"))]
    assert climbs == []
    assert "ditas.quantization.checkpoint" in _imports(SRC / "loaders.py")


def test_no_import_cycle_between_files():
    """Imports inside functions count too: a cycle hidden in a function is still a cycle."""
    graph = {_module_name(f): _imports(f) for f in SRC.rglob("*.py")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == "ditas" or node.startswith(nxt + "."):
                continue  # a package's own __init__ (ditas.__init__ re-exports the public names)
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := cycle_from(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            assert cycle_from(start, [start]) is None


def test_algorithms_name_no_family_layer():
    """The algorithms ask the adapter: no DiT layer name appears in their code."""
    names = ("adaLN_modulation", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "to_q", "to_out", "norm1",
             "transformer_blocks", "final_layer")
    for rel in ("quantization/apply.py", "quantization/smoothing.py", "quantization/weight_only.py",
                "calibration/blockwise.py", "calibration/trajectory.py"):
        code = "\n".join(line for line in (SRC / rel).read_text().splitlines()
                         if not line.lstrip().startswith(("#", '"', "``", "-")))
        tree = ast.parse((SRC / rel).read_text())
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                   and not (n.value.count("\n") or len(n.value) > 200)]
        for s in strings:
            for name in names:
                assert name not in s, f"{rel} names {name!r}"
        assert ".blocks[" not in code and "model.blocks" not in code, rel


def test_quantized_folder_records_its_family(tmp_path):
    from ditas.quantization.apply import quantize
    from ditas.quantization.checkpoint import read_config, save_quantized
    from ditas.quantization.recipes import recipe_config

    m = random_dit(1, hidden=32, depth=1, heads=2)
    cfg = recipe_config("rtn", steps=2, calib_labels=1)
    q, _ = quantize(m, cfg, progress=False, kernel="simulated")
    save_quantized(q, tmp_path / "q", cfg)
    data = read_config(tmp_path / "q")
    assert data["family"] == "dit" and data["model"] == m.config.to_dict()
    back = load_quantized(tmp_path / "q", device="cpu", kernel="simulated")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 4]), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(back(x, t, y), q(x, t, y))


@pytest.mark.exactness
def test_dit_quantization_is_unchanged_by_the_seam():
    """From the same calibration trajectory, quantizing the same DiT with the same config gives the
    integer codes and zero points the code before the seam gave, bit for bit, and its scales and
    output up to float rounding (tests/data/legacy_quantized_v1*, recorded on another CPU, see
    make_legacy_quantized.py; the trajectory is replayed because the sampler's noise changed since)."""
    from ditas.model.adapters.base import BlockCall, CalibrationRecord
    from ditas.quantization.apply import quantize
    from ditas.quantization.recipes import recipe_config

    traj = load_file(str(DATA / "legacy_quantized_v1_trajectory.safetensors"))
    steps = len([k for k in traj if k.startswith("tokens.")])
    calib = CalibrationRecord([BlockCall((traj[f"tokens.{i}"], traj[f"cond.{i}"])) for i in range(steps)])
    m = random_dit(3, hidden=32, depth=2, heads=2)
    cfg = recipe_config("ditas", steps=2, calib_labels=2, lora_rank=4, lora_rounds=2, alpha_grid=(0.3, 0.7),
                        lora_dtype="float32")  # recorded when the recipe kept fp32 LoRA factors
    q, _ = quantize(m, cfg, calib, progress=False, kernel="simulated")  # as the _fake file
    legacy = quant_layers(load_dit(DATA / "legacy_quantized_v1", kernel="simulated"))
    assert set(quant_layers(q)) == set(legacy)
    for name, layer in quant_layers(q).items():  # the integers exactly, the scales to float rounding
        assert torch.equal(layer.qweight, legacy[name].qweight) and torch.equal(layer.wzero, legacy[name].wzero), name
        assert_close_to_recorded(layer.wscale, legacy[name].wscale)
    ref = load_file(str(DATA / "legacy_quantized_v1_fake.safetensors"))
    with torch.no_grad():
        torch.manual_seed(0)
        assert_close_to_recorded(q(ref["x"], ref["t"], ref["y"]), ref["out"])


def test_cli_modules_call_the_library_and_never_each_other():
    """The CLI parses, checks, calls the library and prints: a command module imports no other
    command module (only ``cli/main.py`` does, to register them, and any module may use the shared
    argparse helpers ``cli/_*.py``), and nothing outside ``cli/`` imports from it."""
    helpers = {_module_name(f) for f in (SRC / "cli").glob("_*.py")} | {"ditas.cli"}
    crossings = [(f.name, n) for f in (SRC / "cli").glob("*.py") if f.name != "main.py"
                 for n in _imports(f) if n.startswith("ditas.cli") and n not in helpers]
    assert crossings == []
    for helper in (SRC / "cli").glob("_*.py"):  # a helper is shared by commands, it does not use one
        assert [n for n in _imports(helper) if n.startswith("ditas.cli") and n not in helpers] == [], helper.name
    into_cli = [(str(f.relative_to(SRC)), n) for f in SRC.rglob("*.py") if f.parent.name != "cli"
                for n in _imports(f) if n.startswith("ditas.cli")]
    assert {f for f, _ in into_cli} == {"__main__.py"}  # ``python -m ditas`` is the command line
