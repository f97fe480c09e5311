"""The structure probe of the generic adapter: hooks that watch ONE model call and find what
``generic_structure.py`` describes, from the module tree and data flow only, never by names.

How the structure is found (``StructureProbe``, run on the first model call inside
``ditas.record_calibration``, or on one synthetic call for families that sample their own
calibration run):

- Blocks: the children of the outermost ``nn.ModuleList`` / ``nn.Sequential`` s whose children
  are all of one class and contain an ``nn.Linear`` (not bare linears), in the order the recorded
  call runs them. A block called more than once per model call is not a block (its linears stay
  float); so is one the call never runs.
- Smoothing groups: the linears of a block that read the SAME input tensor (object identity, seen
  by forward pre-hooks) share one factor: q/k/v, fused projections, Flux's single-block
  ``to_q/to_k/to_v`` + ``proj_mlp``, ... never by names. Every factor divides the input on the fly
  (``QuantLinear.smooth``), except one exact fold it can prove: where dividing some output rows
  of an earlier linear of the same owner by any ``s`` divides an attention-output linear's input
  by ``s`` (V of attention), checked by replaying the block with those rows divided by a random
  factor, the factor goes into those rows (``prev_rows``, as the hand-written adapters do).
- Roles (``base.py``), from data flow only: ``fc2`` if the input is the output of an activation
  module (torch's ``nn.GELU``/``nn.SiLU``/..., or a class of a library's ``activations`` module);
  ``fc1`` if every member's output goes into an activation module (or the linear sits inside one,
  as diffusers' ``GELU.proj``); ``proj`` if the input is not a tensor passed to the linear's
  owner (its nearest non-container ancestor, e.g. the attention module) and another linear of
  that owner ran before it (the attention output: made inside the owner from earlier linears'
  outputs); ``qkv`` otherwise (a normalised, modulated stream: attention or context projections).
- Modulation linears: a linear of a block whose input has no token axis (2-D: one vector per
  sample, e.g. ``SiLU(temb)`` into adaLN) is stored weight-only in int8 (``adaln="int8"``), as the
  hand-written adapters store adaLN linears.
- Not quantized, with the reason in ``report.json`` (``report["adapter"]["not_quantized"]``):
  linears outside the blocks (embeddings, final projection), linears called more than once per
  model call (shared weights), linears the call never runs, linears of repeated or unused blocks,
  and names matching ``QuantConfig.scope.skip`` (``--skip PATTERN``).
- Block-wise replay: for each pair of consecutive blocks, every argument of block ``i + 1`` is
  matched to block ``i``'s output tensors or its own arguments (object identity), or is a plain
  constant; the mapping is CHECKED by replaying block ``i`` on a copy of its recorded call and
  comparing the next call the mapping makes with the real one. Where that fails (the model works
  between two stacks, or a block returns something else), block ``i + 1`` starts a new segment:
  its own FP calls are recorded during the user's run (``CalibrationRecord.segments``, streamed
  to disk under ``calib_cache`` when given: ``generic_calls.py``) and it is calibrated on them.
  Only segment starts are recorded, so memory grows with one block's inputs, not with depth. The
  probe's replays run with every forward hook of the block silenced (``_hooks_silenced``): no
  hook of the user's, nor the recorder's, sees them.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ...errors import CalibrationError
from .base import BlockCall
from .generic_structure import GenericBlock, GenericStructure, Source, Transition, _output_items

_TORCH_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GLU,
                      nn.Softplus, nn.Hardswish, nn.ReLU6, nn.PReLU, nn.SELU, nn.CELU)
_CONSTANTS = (type(None), bool, int, float, str)
# replayed block outputs must give the next call within these (float rounding of a replay)
_RTOL, _ATOL = 1e-4, 1e-5


def is_activation(module: nn.Module) -> bool:
    """An activation module: torch's, or a class of a library's ``activations`` module
    (diffusers' GELU/GEGLU/SwiGLU/ApproximateGELU, transformers' activations)."""
    return isinstance(module, _TORCH_ACTIVATIONS) or type(module).__module__.rsplit(".", 1)[-1] == "activations"


def block_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """The children of the outermost ModuleList/Sequential s of one class that contain a linear
    (qualified name -> block), in module order."""
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) == 0:
            continue
        kids = list(m.named_children())
        if len({type(c) for _, c in kids}) != 1 or isinstance(kids[0][1], nn.Linear):
            continue
        if not all(any(isinstance(x, nn.Linear) for x in c.modules()) for _, c in kids):
            continue
        for k, c in kids:
            found[f"{name}.{k}" if name else k] = c
        inside.append(name)
    return found

# ----------------------------------------------------------------------------------------------
#                                        The probe
# ----------------------------------------------------------------------------------------------


@dataclass
class _LinearSeen:
    rel: str
    gid: int
    ndim: int
    owner_input: bool
    after_owner_linear: bool
    from_activation: bool
    inside_activation: bool
    into_activation: bool = False


@dataclass
class _BlockRun:
    """What one block call shows while it runs (tensor references live only until it ends)."""

    name: str
    call: BlockCall                                   # as called (object identity)
    snapshot: BlockCall                               # detached copy taken before it ran
    # the tensors are held (not only their ids: a freed tensor's id is reused) until the block ends
    inputs: list = field(default_factory=list)        # distinct linear inputs (group ids)
    outputs: dict = field(default_factory=dict)       # id(linear output) -> (output, rel)
    owner_inputs: dict = field(default_factory=dict)  # owner name -> {id: tensor} of its call
    owner_linears: Counter = field(default_factory=Counter)
    act_outputs: dict = field(default_factory=dict)   # id -> activation module output
    linears: list = field(default_factory=list)

    def holds(self, table: dict, x: torch.Tensor) -> bool:
        """Whether ``x`` itself is in ``table`` (id -> tensor)."""
        return table.get(id(x)) is x


_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called")


@contextmanager
def _hooks_silenced(root: nn.Module) -> Iterator[None]:
    """The forward hooks of ``root`` and its submodules (the user's, the recorder's, the probe's)
    do not run inside: the probe's replays are not model calls, and nobody else may see them.
    Each module's hook tables are swapped for empty ones and put back (never changed in place:
    the call that runs the probe's hook may be iterating them)."""
    saved = [(m, name, getattr(m, name)) for m in root.modules() for name in _HOOK_TABLES if hasattr(m, name)]
    for m, name, _ in saved:
        setattr(m, name, OrderedDict())
    try:
        yield
    finally:
        for m, name, table in saved:
            setattr(m, name, table)


def _tensor_ids(args: tuple, kwargs: dict) -> dict[int, torch.Tensor]:
    return {id(v): v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)}


def _values_match(a: Any, b: Any) -> bool:
    """Whether two call values agree (tensors within float rounding of a replay, containers
    elementwise, constants by equality)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=_RTOL, atol=_ATOL))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_values_match(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_match(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 (objects without a usable equality do not match)
        return False


def _source(v: Any, prev: BlockCall, outs: list, output_is_tensor: bool) -> Source | None:
    if isinstance(v, _CONSTANTS):
        return Source("const", v)
    for k, o in enumerate(outs):
        if o is v:
            return Source("out", None if output_is_tensor else k)
    for j, a in enumerate(prev.args):
        if a is v:
            return Source("arg", j)
    for key, a in prev.kwargs.items():
        if a is v:
            return Source("kwarg", key)
    return None


def learn_transition(prev: BlockCall, output: Any, call: BlockCall) -> Transition | None:
    """The mapping from block ``i``'s call and output to block ``i + 1``'s ``call``, by object
    identity (None where an argument comes from elsewhere)."""
    outs = _output_items(output)
    if not outs:
        return None
    tensor = isinstance(output, torch.Tensor)
    args = [_source(v, prev, outs, tensor) for v in call.args]
    kwargs = [(k, _source(v, prev, outs, tensor)) for k, v in call.kwargs.items()]
    if any(s is None for s in args) or any(s is None for _, s in kwargs):
        return None
    return Transition(tuple(args), tuple(kwargs))


def _guarded(hook):
    """A probe hook that never breaks the user's call: what it meets stops the probe (``finish``
    reports it) and the call goes on."""
    import functools

    @functools.wraps(hook)
    def run(self, *args, **kwargs):
        try:
            hook(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 (reported by finish, in one line)
            self.failed, self.active = exc, False
    return run


class StructureProbe:
    """Hooks that watch ONE model call (between ``arm`` and ``finish``) and make the
    ``GenericStructure``. ``pending``: the calls of the blocks found to start a segment during
    that call (detached), for the recorder."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.candidates = block_candidates(model)
        if not self.candidates:
            raise CalibrationError(f"a {type(model).__name__} has no repeated blocks (a ModuleList of one class "
                                   "holding linears): the generic adapter cannot quantize it")
        self.block_of = {m: n for n, m in self.candidates.items()}
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.owner = {n: self._owner(n) for n in self.linears}
        self.active = self.replaying = False
        self.failed: Exception | None = None
        self.block_calls: Counter = Counter()
        self.linear_calls: Counter = Counter()
        self.order: list[str] = []
        self.seen: dict[str, list[_LinearSeen]] = {}
        self.edges: dict[str, tuple[str, Transition | None, str]] = {}
        self.pending: dict[str, BlockCall] = {}
        self.folds: dict[str, tuple] = {}
        self.run: _BlockRun | None = None
        self.prev: tuple | None = None  # (name, call, snapshot, output, replayed output) of the last block
        self.structure: GenericStructure | None = None
        self.handles: list = []
        self._install()

    # -- hooks ------------------------------------------------------------------------------------
    def _owner(self, lin: str) -> str:
        """The nearest ancestor of ``lin`` that is no container (the module whose code calls it)."""
        parts = lin.split(".")[:-1]
        while parts:
            m = self.model.get_submodule(".".join(parts))
            if not isinstance(m, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
                return ".".join(parts)
            parts.pop()
        return ""

    def _install(self) -> None:
        h = self.handles
        for name, block in self.candidates.items():
            h.append(block.register_forward_pre_hook(self._block_pre, with_kwargs=True))
            h.append(block.register_forward_hook(self._block_post, with_kwargs=True))
            for rel, m in block.named_modules():
                full = f"{name}.{rel}" if rel else name
                if is_activation(m):
                    h.append(m.register_forward_pre_hook(self._act_pre))
                    h.append(m.register_forward_hook(self._act_post))
                elif rel and not isinstance(m, (nn.Linear, nn.ModuleList, nn.Sequential, nn.ModuleDict)):
                    h.append(m.register_forward_pre_hook(
                        lambda mod, args, kwargs, full=full: self._owner_pre(full, args, kwargs), with_kwargs=True))
        for name, lin in self.linears.items():
            h.append(lin.register_forward_pre_hook(lambda mod, args, name=name: self._linear_pre(name, args)))
            h.append(lin.register_forward_hook(lambda mod, args, out, name=name: self._linear_post(name, out)))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.run = self.prev = None

    def _watching(self) -> bool:
        return self.active and not self.replaying

    @_guarded
    def _owner_pre(self, name: str, args, kwargs) -> None:
        if self._watching() and self.run is not None:
            self.run.owner_inputs[name] = _tensor_ids(args, kwargs)

    @_guarded
    def _act_pre(self, module, args) -> None:
        if self._watching() and self.run is not None and args and isinstance(args[0], torch.Tensor):
            out, rel = self.run.outputs.get(id(args[0]), (None, None))
            if out is not args[0]:
                return
            for seen in self.run.linears:
                if seen.rel == rel:
                    seen.into_activation = True

    @_guarded
    def _act_post(self, module, args, out) -> None:
        if self._watching() and self.run is not None and isinstance(out, torch.Tensor):
            self.run.act_outputs[id(out)] = out

    @_guarded
    def _linear_pre(self, name: str, args) -> None:
        if not self._watching():
            return
        self.linear_calls[name] += 1
        run = self.run
        if run is None or not name.startswith(run.name + ".") or self.block_calls[run.name] > 1:
            return
        x = args[0]
        gid = next((i for i, t in enumerate(run.inputs) if t is x), None)
        if gid is None:
            gid = len(run.inputs)
            run.inputs.append(x)
        owner = self.owner[name]
        rel = name[len(run.name) + 1:]
        inside_act = owner != "" and is_activation(self.model.get_submodule(owner))
        run.linears.append(_LinearSeen(rel, gid, x.ndim, run.holds(run.owner_inputs.get(owner, {}), x),
                                       run.owner_linears[owner] > 0, run.holds(run.act_outputs, x), inside_act))
        run.owner_linears[owner] += 1

    @_guarded
    def _linear_post(self, name: str, out) -> None:
        if self._watching() and self.run is not None and name.startswith(self.run.name + "."):
            self.run.outputs[id(out)] = (out, name[len(self.run.name) + 1:])

    @_guarded
    def _block_pre(self, module, args, kwargs) -> None:
        if not self._watching():
            return
        name = self.block_of[module]
        self.block_calls[name] += 1
        call = BlockCall(tuple(args), dict(kwargs))
        if self.block_calls[name] == 1:
            self.order.append(name)
            self.edges[name] = self._edge(call)
            if self.edges[name][1] is None:
                self.pending[name] = call.detached()
        self.run = _BlockRun(name, call, call.detached())
        self.run.owner_inputs[name] = _tensor_ids(args, kwargs)

    def _edge(self, call: BlockCall) -> tuple[str, Transition | None, str]:
        """(previous block, checked transition or None, why not)."""
        if self.prev is None:
            return "", None, "the first block"
        pname, real, snap, output, replayed = self.prev
        t = learn_transition(real, output, call)
        if t is None:
            return pname, None, f"its call is not made from {pname}'s output and arguments alone"
        built = t.apply(snap, replayed) if replayed is not None else None
        if built is None or not (_values_match(built.args, call.args) and _values_match(built.kwargs, call.kwargs)):
            return pname, None, f"replaying {pname} does not give its call (the model changes it in between)"
        return pname, t, ""

    @_guarded
    @torch.no_grad()
    def _block_post(self, module, args, kwargs, output) -> None:
        if not self._watching() or self.run is None:
            return
        name, run = self.run.name, self.run
        replayed = None
        if _output_items(output):
            self.replaying = True
            try:
                again = run.snapshot.detached()
                with _hooks_silenced(module):
                    replayed = module(*again.args, **again.kwargs)
            except Exception:  # noqa: BLE001 (a block that cannot be replayed starts the next segment)
                replayed = None
            finally:
                self.replaying = False
        if self.block_calls[name] == 1:
            self.seen[name] = run.linears
            self.folds[name] = self._prev_row_folds(module, run)
        self.prev = (name, run.call, run.snapshot, output, replayed)
        self.run = None

    # -- exact folds into the previous linear's rows ----------------------------------------------
    def _prev_row_folds(self, block: nn.Module, run: _BlockRun) -> tuple:
        """For each attention-output-like linear (alone on an input made inside its owner after
        another of the owner's linears ran), the earlier linear of the same owner and the rows of it
        whose division by any ``s`` divides that input by ``s`` exactly (V of attention: output
        channel c is linear in V's channel c). Found by replaying the block with those rows
        divided by a random factor, never by names."""
        gids = Counter(s.gid for s in run.linears)
        folds = []
        for i, p in enumerate(run.linears):
            if p.owner_input or not p.after_owner_linear or p.from_activation or p.ndim < 3 or gids[p.gid] > 1:
                continue
            width = block.get_submodule(p.rel).in_features
            owner = self.owner[f"{run.name}.{p.rel}"]
            base = None
            for t in run.linears[:i]:
                lin = block.get_submodule(t.rel)
                if self.owner[f"{run.name}.{t.rel}"] != owner or t.ndim < 3 or lin.out_features % width:
                    continue
                for k in range(lin.out_features // width):
                    rows = (k * width, (k + 1) * width)
                    if base is None:
                        base = self._input_of(block, run, p.rel)
                    if base is not None and self._divides(block, run, p.rel, t.rel, rows, base):
                        folds.append((p.rel, t.rel, rows))
                        break
                else:
                    continue
                break
        return tuple(folds)

    @torch.no_grad()
    def _input_of(self, block: nn.Module, run: _BlockRun, rel: str, change=None) -> torch.Tensor | None:
        """The input of ``block.rel`` when the block is replayed on its recorded call (after
        ``change()``, undone by the function it returns)."""
        got: list[torch.Tensor] = []
        self.replaying = True
        undo = change() if change is not None else None
        try:
            again = run.snapshot.detached()
            with _hooks_silenced(block):
                h = block.get_submodule(rel).register_forward_pre_hook(lambda m, a: got.append(a[0].detach().clone()))
                block(*again.args, **again.kwargs)
                h.remove()
        except Exception:  # noqa: BLE001 (a block that cannot be replayed has no provable fold)
            got = []
        finally:
            if undo is not None:
                undo()
            self.replaying = False
        return got[0] if len(got) == 1 else None

    def _divides(self, block: nn.Module, run: _BlockRun, rel: str, target: str, rows: tuple[int, int],
                 base: torch.Tensor) -> bool:
        lin = block.get_submodule(target)
        s = torch.rand(rows[1] - rows[0], generator=torch.Generator().manual_seed(0)) * 1.5 + 0.5

        def change():
            saved = (lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
            with torch.no_grad():
                lin.weight[rows[0]:rows[1]] /= s.to(lin.weight)[:, None]
                if lin.bias is not None:
                    lin.bias[rows[0]:rows[1]] /= s.to(lin.bias)

            def undo():
                with torch.no_grad():
                    lin.weight.copy_(saved[0])
                    if saved[1] is not None:
                        lin.bias.copy_(saved[1])
            return undo

        x = self._input_of(block, run, rel, change)
        if x is None or x.shape != base.shape:
            return False
        back = x.double() * s.to(x.device).double()
        return bool(torch.allclose(back, base.double(), rtol=_RTOL, atol=_ATOL * float(base.abs().max())))

    # -- one call ---------------------------------------------------------------------------------
    def arm(self) -> None:
        self.active = True

    def finish(self) -> GenericStructure:
        """The structure of the watched call; its hooks are removed."""
        self.active = False
        try:
            if self.failed is not None:
                raise CalibrationError(f"the structure probe of the {type(self.model).__name__} failed: "
                                       f"{type(self.failed).__name__}: {self.failed}")
            self.structure = self._structure()
        finally:
            self.close()
        return self.structure

    def _structure(self) -> GenericStructure:
        blocks_ok = [n for n in self.order if self.block_calls[n] == 1]
        if not blocks_ok:
            raise CalibrationError(f"the recorded call of the {type(self.model).__name__} ran none of its repeated "
                                   "blocks exactly once: the generic adapter cannot calibrate it")
        reasons: dict[str, str] = {}
        for lin in self.linears:
            block = next((b for b in self.candidates if lin.startswith(b + ".")), None)
            if block is None:
                reasons[lin] = "outside the repeated blocks (embedding, conditioning or output projection)"
            elif self.block_calls[block] == 0:
                reasons[lin] = "its block is not run by the recorded call"
            elif self.block_calls[block] > 1:
                reasons[lin] = f"its block runs {self.block_calls[block]} times per model call"
            elif self.linear_calls[lin] == 0:
                reasons[lin] = "not run by the recorded call"
            elif self.linear_calls[lin] > 1:
                reasons[lin] = f"runs {self.linear_calls[lin]} times per model call (shared weights)"
            elif 0 in (self.model.get_submodule(lin).in_features, self.model.get_submodule(lin).out_features):
                reasons[lin] = "has no weights (zero input or output features)"
        blocks = []
        for i, name in enumerate(blocks_ok):
            prev, t, why = self.edges[name]
            if i > 0 and prev != blocks_ok[i - 1]:
                t, why = None, f"the block before it ({prev}) is not a block"
            if i == 0:
                t, why = None, "the first block"
            groups, weight_only = _groups(name, self.seen.get(name, []), reasons)
            folds = tuple(f for f in self.folds.get(name, ()) if not {f"{name}.{f[0]}", f"{name}.{f[1]}"} & set(reasons))
            blocks.append(GenericBlock(name, name.rsplit(".", 1)[0], groups, weight_only, t, why, folds))
        self.pending = {b.name: self.pending[b.name] for b in blocks if b.transition is None and b.name in self.pending}
        return GenericStructure(type(self.model).__name__, tuple(blocks), tuple(sorted(reasons.items())))


def _groups(block: str, seen: list[_LinearSeen], reasons: dict[str, str]):
    """The block's smoothing groups (members sharing an input, in call order, with their role)
    and its modulation linears (2-D input)."""
    by_gid: dict[int, list[_LinearSeen]] = {}
    weight_only = []
    for s in seen:
        if f"{block}.{s.rel}" in reasons:
            continue
        if s.ndim == 2:
            weight_only.append(s.rel)
            continue
        by_gid.setdefault(s.gid, []).append(s)
    groups = []
    for members in by_gid.values():
        first = members[0]
        if first.from_activation:
            role = "fc2"
        elif all(m.into_activation or m.inside_activation for m in members):
            role = "fc1"
        elif not first.owner_input and first.after_owner_linear:
            role = "proj"
        else:
            role = "qkv"
        groups.append((tuple(m.rel for m in members), role))
    return tuple(groups), tuple(weight_only)
