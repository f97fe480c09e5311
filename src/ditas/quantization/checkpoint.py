"""Quantized model folders: ``config.json`` + ``model.safetensors`` (+ ``report.json``).

``config.json`` holds ``"family"`` (the model adapter's family, e.g. ``dit``; absent in folders
written before families existed, which are all ``dit``), ``"model"`` (the adapter's description
of the architecture, for DiT the DiTConfig) and ``"quantization"`` (format version, recipe,
bits, layouts, the full QuantConfig and one entry per quantized layer). ``model.safetensors``
holds, per ``QuantLinear``, ``<name>.qweight`` (codes packed to the weight bit width, 1-D uint8),
``wscale``, ``wzero`` (uint8 since format version 3 when its values are integers in 0..255, as
ditas makes them; fp32 otherwise and in older folders), ``bias``, ``smooth``, ``lora_down``, ``lora_up`` as present (the LoRA factors
in the layer's ``lora_dtype``, recorded in its entry since format version 2; version 1 folders
hold float32 factors and still load), ``input_fold``/``output_fold`` as present (since version 4:
the smoothing factors folded around the layer, ``folds``; a float linear's ``output_fold`` is
listed under ``folded_float_layers``), since version 5 number formats and rotations, version 6
(written only where a layer has one) the late-step activation format (``late_abits``,
``step_precision.py``), and the float
tensors of everything else. adaLN linears stored weight-only (``WeightOnlyInt8Linear``) are listed
under ``"weight_only_layers"`` and keep their int8 ``qweight``, ``wscale`` and ``bias``. ``load_quantized`` builds the model (by its family's adapter) on the meta device, puts
``QuantLinear`` modules in place of the quantized layers and only then allocates memory, so no
float weight is ever created for a quantized layer. Save then load is bit-exact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..fileio import json_text, publish_dir
from ..model.adapters.registry import adapter_class, adapter_for
from ..model.empty import empty_parameters
from ..model.state_files import read_config_json, read_safetensors
from ..memory import release_freed_memory
from ..validate import check_finite_state, check_scales, state_config_problem
from . import packing
from .fp4 import FP4_BLOCKS, decode_block_scales, encode_block_scales, scale_bits_problem
from .folds import FOLD_UNKNOWN, add_float_fold_slots, folded_float_layers, unrecorded_folds
from .kernels import AUTO, canonical, use_kernels
from .layer_schema import check_layer_table, check_layer_tensors, layer_args, layer_meta
from .linear import QuantLinear
from .step_precision import use_step_precision
from .weight_only import WeightOnlyInt8Linear

# 5: number formats: each layer entry says its weights' and activations' format ("w_format",
#    "a_format": int, nvfp4, mxfp4) and "act_group_size" (group-wise INT activations, "group"
#    granularity); FP4 weights: E2M1 codes packed 2 per byte, ``wscale`` as uint8 block-scale bits
#    (E4M3 for nvfp4, E8M0 for mxfp4), no ``wzero``, nvfp4's fp32 tensor scale as ``wtscale``;
#    older folders are all int;
# 4: each layer entry says whether it holds ``input_fold`` / ``output_fold`` (the smoothing factors
#    folded around it, ``folds``) and ``folded_float_layers`` lists the float linears holding an
#    ``output_fold``; older folders load, with their folded layers marked unknown (LoRA refuses them);
# 3: a layer's integer-valued weight zero points in 0..255 are stored as uint8 (lossless; the layer
#    holds them as float32 again after loading);
# 2: each layer entry says how its LoRA factors are stored ("lora_dtype": float32 or bfloat16);
# 1 (read, never written): LoRA factors in float32
FORMAT_VERSION = 5
LATE_STEPS_FORMAT_VERSION = 6  # layers with late-step activations (written only by a model that has them)
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def weight_only_layers(model: nn.Module) -> dict[str, WeightOnlyInt8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, WeightOnlyInt8Linear)}


def save_quantized(model: nn.Module, path: str | os.PathLike, quant_config: dict[str, Any] | None = None,
                   report: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Writes the quantized model folder atomically (an interrupted write leaves nothing).

    An existing ``path`` is replaced only with ``overwrite`` and only if ditas wrote it
    (``ditas.fileio.output_dir``).
    """
    return publish_dir(path, "ditas-quantized", lambda folder: write_quantized(model, folder, quant_config, report),
                       overwrite=overwrite)


def write_quantized(model: nn.Module, folder: Path, quant_config: dict[str, Any] | None = None,
                    report: dict[str, Any] | None = None) -> None:
    """Writes the files of a quantized model folder into the existing, empty ``folder``."""
    from safetensors.torch import save_file

    layers = quant_layers(model)
    if not layers:
        raise CheckpointError("the model has no quantized layers: save it with ditas.save_dit")
    adapter = adapter_for(model)
    model_config = adapter.model_config()  # first: a model that cannot be rebuilt is refused before any work
    qmeta = quantization_meta(model, quant_config)
    tensors = {k: v.detach().contiguous().cpu() for k, v in packed_state(qmeta["layers"], model.state_dict()).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "ditas-quantized"})
    (folder / "config.json").write_text(json_text({"format": "ditas-quantized", "family": adapter.family,
                                                  "quantization": qmeta, "model": model_config},
                                                  "config.json"))
    if report is not None:
        (folder / "report.json").write_text(json_text(report, "report.json"))


def packed_state(layers: dict[str, dict[str, Any]], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a model's state dict) as saved: the codes of each quantized layer (``layers``: layer
    name -> its table entry, ``layer_meta``) bit-packed, its zero points compacted
    (``_compact_zero_points``) and FP4 block scales as their uint8 bits; every other tensor as it
    is. Shared by ``save_quantized`` and diffusers' ``save_pretrained`` (``ditas.diffusers_quantizer``)."""
    out = dict(state)
    for name, meta in layers.items():
        if f"{name}.qweight" in out:
            out[f"{name}.qweight"] = packing.pack_codes(out[f"{name}.qweight"], meta["wbits"])
        if f"{name}.wzero" in out:
            out[f"{name}.wzero"] = _compact_zero_points(out[f"{name}.wzero"])
        fmt = meta.get("w_format", "int")
        if fmt in FP4_BLOCKS and f"{name}.wscale" in out:
            out[f"{name}.wscale"] = encode_block_scales(out[f"{name}.wscale"], fmt)
    return out


def quantization_meta(model: nn.Module, quant_config: Any = None) -> dict[str, Any]:
    """The ``quantization`` table of a quantized model's ``config.json`` (format, recipe, formats,
    the config and one entry per quantized and weight-only layer)."""
    layers = quant_layers(model)
    cfg = quant_config if quant_config is not None else getattr(model, "quant_config", {}) or {}
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    first = next(iter(layers.values()))
    return {
        # a folder without late steps stays readable by a ditas that reads format 5
        "format_version": LATE_STEPS_FORMAT_VERSION if any(m.late_activation_format is not None
                                                           for m in layers.values()) else FORMAT_VERSION,
        "recipe": cfg.get("recipe", "custom"),
        "bits": {"weights": first.weight_format.bits, "activations": first.activation_format.bits},
        "weight_layout": first.weight_format.layout,
        "group_size": first.weight_format.group_size,
        "act_granularity": first.activation_format.granularity,
        "formats": {"weights": first.weight_format.format, "activations": first.activation_format.format},
        "range_mode": first.weight_format.range_mode,
        "qweight_packing": "packed",
        "config": cfg,
        "layers": {name: layer_meta(m) for name, m in layers.items()},
        "weight_only_layers": {name: {"in_features": m.in_features, "out_features": m.out_features,
                                      "bias": m.bias is not None, "compute": m.compute, "bits": 8}
                               for name, m in weight_only_layers(model).items()},
        "folded_float_layers": folded_float_layers(model),
    }


def _compact_zero_points(zero: torch.Tensor) -> torch.Tensor:
    """Zero points as uint8 when that is exact (integers in 0..255: always, for <= 8-bit weights
    quantized by ditas), else unchanged; a quarter of the bytes."""
    if zero.is_floating_point() and zero.numel() and bool(((zero >= 0) & (zero <= 255) & (zero == zero.round())).all()):
        return zero.to(torch.uint8)
    return zero


# A diffusers model config quantized by ditas (written by diffusers' save_pretrained through
# ``ditas.diffusers_quantizer``) holds the same table as a ditas folder under ``quantization_config``.
QUANT_METHOD = "ditas"  # diffusers' quantization_config["quant_method"] of a ditas-quantized model


def is_ditas_config(data: Any) -> bool:
    """Whether a parsed ``config.json`` is a diffusers model config quantized by ditas."""
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def ditas_view(data: dict[str, Any]) -> dict[str, Any]:
    """A diffusers-saved ``config.json`` seen as a ditas folder's (``family``, ``quantization``,
    ``model``), so that ``ditas.load_quantized`` reads both layouts with one reader."""
    qc = data["quantization_config"]
    config = {k: v for k, v in data.items() if not k.startswith("_") and k != "quantization_config"}
    return {"format": "ditas-quantized", "family": qc.get("family"), "quantization": qc.get("quantization"),
            "model": {"class": data.get("_class_name"), "config": config}}


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a quantized folder (``CheckpointError`` if it is not one)."""
    cfg_file = Path(path) / "config.json"
    if not (cfg_file.exists() or cfg_file.is_symlink()):
        raise CheckpointError(f"{path}: not a quantized model folder (no config.json)")
    from ..readers import Field, read_json

    data = read_json(cfg_file, "quantized model config", {"quantization": Field(dict, required=False)},
                     error=CheckpointError)
    if is_ditas_config(data):  # written by diffusers' save_pretrained (ditas.diffusers_quantizer)
        return ditas_view(data)
    if "quantization" not in data:
        raise CheckpointError(f"{path}: not a ditas quantized model folder (config.json has no 'quantization')")
    return data


def put_quant_layers(model: nn.Module, q: dict[str, Any], path: Any) -> None:
    """Puts empty (meta) ``QuantLinear`` and ``WeightOnlyInt8Linear`` modules in place of the layers
    that the checked ``quantization`` table ``q`` lists, so the saved tensors land in them and no
    float weight is allocated for a quantized layer (``load_quantized`` and diffusers'
    ``from_pretrained``); puts the ``output_fold`` slots on the float linears that hold one, and
    marks the folded layers of a folder that did not record its folds (``folds``)."""
    unknown = unrecorded_folds(model, q)
    with torch.device("meta"):
        for name, meta in q["layers"].items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"{path}: quantized layer {name} does not exist in the model") from None
            if (old.in_features, old.out_features) != (meta["in_features"], meta["out_features"]):
                raise CheckpointError(f"{path}: layer {name} is {meta['in_features']}->{meta['out_features']} in the "
                                      f"file but {old.in_features}->{old.out_features} in the model config")
            try:
                args, kw = layer_args(meta)
                new = QuantLinear(*args, **kw)
            except (KeyError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{path}: bad layer entry for {name} ({str(exc).splitlines()[0]})") from None
            model.set_submodule(name, new)
        for name, meta in q.get("weight_only_layers", {}).items():
            try:
                old = model.get_submodule(name)
                new = WeightOnlyInt8Linear(meta["in_features"], meta["out_features"], bias=meta["bias"],
                                           compute=meta["compute"])
            except AttributeError:
                raise CheckpointError(f"{path}: weight-only layer {name} does not exist in the model") from None
            except (KeyError, ValueError) as exc:
                raise CheckpointError(f"{path}: bad weight-only layer entry for {name} ({exc})") from None
            if (old.in_features, old.out_features) != (new.in_features, new.out_features):
                raise CheckpointError(f"{path}: weight-only layer {name} does not match the model config")
            model.set_submodule(name, new)
        add_float_fold_slots(model, q.get("folded_float_layers", {}), path)
    for name in unknown:
        setattr(model.get_submodule(name), FOLD_UNKNOWN, True)


def unpack_qweight(key: str, meta: dict[str, Any], packed: torch.Tensor, source: Any) -> torch.Tensor:
    """The (out, in) codes of a layer's saved, bit-packed ``qweight`` (a one-line error naming the
    tensor when the bytes cannot be the codes its entry ``meta`` describes)."""
    try:
        return packing.unpack_codes(packed, meta["wbits"], (meta["out_features"], meta["in_features"]))
    except ValueError as exc:
        raise CheckpointError(f"{source}: {key} does not hold the {meta['wbits']}-bit codes of a "
                              f"{meta['in_features']}->{meta['out_features']} layer ({exc})") from None


def unpack_block_scales(key: str, meta: dict[str, Any], value: torch.Tensor, source: Any) -> torch.Tensor:
    """A layer's saved ``wscale`` as the layer holds it: FP4 block-scale bits decoded to fp32 (a
    one-line error naming the tensor for bits ditas never writes); INT scales unchanged."""
    fmt = meta.get("w_format", "int")
    if fmt not in FP4_BLOCKS:
        return value
    problem = scale_bits_problem(value, fmt)
    if problem:
        raise CheckpointError(f"{source}: {key} {problem}")
    return decode_block_scales(value, fmt)


def _read_weights(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The saved tensors of a quantized folder: ditas' ``model.safetensors``, or the (possibly
    sharded) ``diffusion_pytorch_model.safetensors`` that diffusers' ``save_pretrained`` writes."""
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors"):
        if (path / name).exists():
            return path / name, read_safetensors(path / name)[0]
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_config_json(index).get("weight_map", {}).values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (path / shard).exists():
                raise CheckpointError(f"{path}: shard {shard} named in {index.name} is missing")
            state.update(read_safetensors(path / shard)[0])
        return index, state
    raise CheckpointError(f"{path}: model.safetensors is missing")


def _config_of(data: Any):
    """The stored config as a ``QuantConfig`` (nested, or the flat form of older folders); the raw
    table if it is not one (a folder written by hand)."""
    from .config import QuantConfig

    try:
        return QuantConfig.from_dict(data)
    except ConfigError:
        return data


def load_quantized(path: str | os.PathLike, data: dict[str, Any] | None = None, kernel: str = AUTO,
                   device: str | torch.device | None = None, dtype: torch.dtype | None = torch.float32,
                   **kwargs: Any) -> nn.Module:
    """Builds a quantized model from its folder, in its family's class (for diffusers families the
    user's diffusers class); ``data`` is the parsed ``config.json`` (read if None).

    ``kernel``: ``"auto"`` (default: the most preferred kernel that supports each layer on
    ``device``) or a name in ``kernels.KERNELS``; a named kernel that cannot run a layer is an
    error. ``device``: where the model goes (default CPU). ``dtype``: the compute dtype of the
    float parts (default float32, as diffusers loads; None: as saved; the quantized layers keep
    their declared precisions). Scales and zero points that would give garbage on any kernel are refused here (``validate.check_scales``), whichever kernel is asked for.
    """
    if data is None:
        data = read_config(path)
    elif is_ditas_config(data):
        data = ditas_view(data)
    if kwargs:
        raise CheckpointError(f"unexpected options for a quantized model: {sorted(kwargs)} (the kernel is "
                              "chosen with kernel=)")
    path = Path(path)
    try:
        kernel = canonical(kernel)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    q = data.get("quantization")
    check_layer_table(q, f"{path}/config.json")
    version = q.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: quantized format version {version!r} is not supported "
                              f"(this ditas reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    family = data.get("family", "dit")  # folders written before families were all DiT
    if not isinstance(family, str):
        raise CheckpointError(f"{path}/config.json: 'family' is {family!r}, expected a model family name")
    try:
        adapter_cls = adapter_class(family)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}/config.json: bad model config (no 'model' table)")
    weights, state = _read_weights(path)
    check_finite_state(state, str(weights))
    check_scales(state, str(weights))
    if q.get("qweight_packing") != "packed":
        raise CheckpointError(f"{path}/config.json: qweight_packing is {q.get('qweight_packing')!r}; this ditas "
                              "reads bit-packed codes ('packed')")

    with empty_parameters():  # parameters take no memory; computed buffers stay real
        try:
            model = adapter_cls.build(data["model"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}/config.json: bad model config ({exc})") from None
    problem = state_config_problem(getattr(model, "config", None), state)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    put_quant_layers(model, q, path)
    expected = model.state_dict()
    for name, meta in q["layers"].items():
        check_layer_tensors(name, meta, state, str(weights))
        zkey = f"{name}.wzero"
        if zkey in state and zkey in expected and state[zkey].dtype == torch.uint8:  # format 3: exact integers
            state[zkey] = state[zkey].to(expected[zkey].dtype)
        key = f"{name}.qweight"
        if key in state:
            state[key] = unpack_qweight(key, meta, state[key], weights)
        if f"{name}.wscale" in state:
            state[f"{name}.wscale"] = unpack_block_scales(f"{name}.wscale", meta, state[f"{name}.wscale"], weights)
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"{weights}: does not match its config.json (missing {missing[:4]}, "
                              f"unknown {unknown[:4]})")
    quantized = tuple(f"{name}." for name in (*q["layers"], *q.get("weight_only_layers", {})))
    for k, v in expected.items():
        # the float model around the quantized layers may be saved in any float dtype (a bf16 model's
        # folder holds bf16 tensors); the quantized layers' tensors have their declared dtypes
        as_saved = state[k].is_floating_point() and v.is_floating_point() and not k.startswith(quantized)
        if tuple(state[k].shape) != tuple(v.shape) or (state[k].dtype != v.dtype and not as_saved):
            raise CheckpointError(f"{weights}: {k} is {tuple(state[k].shape)} {state[k].dtype}, expected "
                                  f"{tuple(v.shape)} {v.dtype}")
    if dtype is not None:  # the saved float model in ``dtype``, as diffusers' torch_dtype: buffers it
        # computes itself (not in the file, e.g. PixArt's fp32 position table) keep their dtype
        state = {k: v.to(dtype) if v.is_floating_point() and not k.startswith(quantized) else v
                 for k, v in state.items()}
    # fresh, aligned storage (the int8 kernels crash on tensors that view into the file's buffer)
    model.load_state_dict({k: v.clone(memory_format=torch.contiguous_format) for k, v in state.items()},
                          strict=True, assign=True)
    empty = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if empty:
        raise CheckpointError(f"{path}: {empty[0]} was not restored from the file")
    model.quant_config = _config_of(q.get("config", {}))
    model.quant_family = family
    if device is not None:
        model = model.to(device)
    use_kernels(model, kernel)
    use_step_precision(model)
    del state
    release_freed_memory()  # the file's bytes and the unpacked copies (about 1 GB at DiT-XL/2 size)
    return model.eval()


def broadcast_quantized(model: nn.Module | None, kernel: str = AUTO,
                        device: str | torch.device | None = None) -> nn.Module:
    """Process 0's quantized ``model`` on every process of a ``torchrun`` group (the others pass
    None); outside a group, ``model`` itself.

    Why: quantizing is float work (calibration runs, searches), so processes with other thread
    counts, or GPUs with non-deterministic reductions, would each make a slightly different model,
    and the images of one row would come from several models. Process 0 sends its folder's files
    (no shared file system needed) and the others load them (save then load is bit-exact).
    """
    import tempfile

    from ..distributed import broadcast_object, process_group

    rank, world = process_group()
    if world == 1:
        return model
    files = None
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="ditas-broadcast-") as tmp:
            write_quantized(model, Path(tmp))
            files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    files = broadcast_object(files)
    if rank == 0:
        return model
    with tempfile.TemporaryDirectory(prefix="ditas-broadcast-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        del files
        return load_quantized(tmp, kernel=kernel, device=device)
