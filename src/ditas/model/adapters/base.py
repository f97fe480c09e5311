"""The model seam: what ditas needs to know about a model family, in one place.

The algorithms (``quantization/apply.py``, ``smoothing.py``, ``weight_only.py``,
``calibration/blockwise.py``, ``calibration/trajectory.py``) never name a family's layers. They
ask the family's ``ModelAdapter`` (one subclass per family, picked by ``registry.adapter_for``):

- the ordered blocks (``blocks``), possibly several stacks (Flux: double, then single blocks),
  each a ``BlockSpec`` with a global index in call order;
- the quantizable linears of a block (``LinearSpec``: qualified name, block index, name within
  the block, role) grouped into ``SmoothGroup`` s: linears that read the SAME input share one
  smoothing factor (DiT's fused ``qkv`` is a group of one; diffusers' separate ``to_q/to_k/to_v``
  are a group of three; Flux's fused projections likewise);
- where each group's smoothing factor goes (``Fold``): into adaLN modulation linear rows, into a
  modulation table parameter, into the rows of the preceding linear, or on the fly
  (``QuantLinear.smooth``) where no exact fold exists;
- the weight-only layers (adaLN modulation linears) stored as int8 after the folds;
- how a block is called, for block-wise replay: the first block's call (args AND kwargs) is
  recorded per step; ``next_call`` turns a block's call and output into the next block's call
  (including the transition between stacks);
- for families that can sample their own calibration trajectory (class-conditional DiT), the
  model seen as a class-conditional sampler (``calibration_sampler``); the run itself is
  ``calibration/trajectory.py``'s (adapters describe, they never run an algorithm).

Roles (``LinearSpec.role``, ``SmoothGroup.role``) are the generic kinds of input a linear reads,
shared by every family so that recipes (``smooth_roles``) mean the same everywhere:

- ``qkv``: a normalised, modulated token stream (attention input projections; also the
  projections of a cross-attention or of a context stream);
- ``proj``: an attention output (the attention output projection);
- ``fc1``: a normalised, modulated token stream entering the MLP;
- ``fc2``: the MLP's hidden activation (after the nonlinearity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

ROLES = ("qkv", "proj", "fc1", "fc2")

FoldKind = Literal["adaln_rows", "table_rows", "prev_rows", "on_the_fly"]
FOLD_KINDS = ("adaln_rows", "table_rows", "prev_rows", "on_the_fly")


# ----------------------------------------------------------------------------------------------
#                                 What an adapter describes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSpec:
    """One quantizable ``nn.Linear``."""

    name: str   # qualified name in the model, e.g. "blocks.3.attn.qkv"
    block: int  # global block index (call order over all stacks)
    rel: str    # name within its block, e.g. "attn.qkv"
    role: str   # one of ROLES


@dataclass(frozen=True)
class Fold:
    """Where a smoothing factor ``s`` (the group's input is divided by ``s``) is made free.

    ``adaln_rows``: the group reads ``LN(x) * (1 + scale) + shift`` with ``shift``/``scale``
        chunks ``shift_chunk``/``scale_chunk`` of the ``num_chunks`` equal chunks of the output
        of the ``nn.Linear`` named ``target``. The shift rows become ``W / s``, ``b / s``; the
        scale rows ``W / s``, ``(b + 1) / s - 1``. Exact.
    ``table_rows``: as ``adaln_rows`` but the chunks are rows (``chunk_dim`` 0) of the parameter
        ``target`` (a modulation table, e.g. ``scale_shift_table`` of shape ``(num_chunks, D)``).
        Exact only when the table alone gives shift and scale; where another term is added
        (PixArt's shared adaLN-single timestep), use ``on_the_fly`` instead.
    ``prev_rows``: the group's input is linear in the output rows ``rows`` (start, stop) of the
        preceding linear ``target`` (V rows of a fused qkv, or all rows of a separate ``to_v``,
        for the attention output projection): those rows (weight and bias) are divided by ``s``.
        ditas folds it before ``target`` is quantized, so ``target``'s group must come later in
        ``BlockSpec.groups`` order. Exact.
    ``on_the_fly``: no exact fold exists (e.g. after GELU): every member's ``QuantLinear.smooth``
        divides its input at run time.
    """

    kind: FoldKind
    target: str = ""                       # qualified name of the linear or parameter
    num_chunks: int = 0                    # adaln_rows / table_rows
    shift_chunk: int = -1
    scale_chunk: int = -1
    chunk_dim: int = 0                     # table_rows: the table's chunk axis
    rows: tuple[int, int] | None = None    # prev_rows: output rows of ``target`` (None: all)

    def __post_init__(self) -> None:
        if self.kind not in FOLD_KINDS:
            raise ValueError(f"fold kind must be one of {FOLD_KINDS}, got {self.kind!r}")
        if self.kind != "on_the_fly" and not self.target:
            raise ValueError(f"a {self.kind} fold needs a target")
        if self.kind in ("adaln_rows", "table_rows"):
            if not (0 <= self.shift_chunk < self.num_chunks and 0 <= self.scale_chunk < self.num_chunks):
                raise ValueError(f"shift/scale chunks {self.shift_chunk}/{self.scale_chunk} outside "
                                 f"0..{self.num_chunks - 1}")


ON_THE_FLY = Fold("on_the_fly")


@dataclass(frozen=True)
class SmoothGroup:
    """Linears that read one input, hence share one smoothing factor and one alpha.

    The search runs on the members' weights stacked along the output dimension (one fused
    weight, exactly as DiT's ``qkv``); results are split back per member by rows.
    """

    members: tuple[LinearSpec, ...]
    role: str
    fold: Fold = ON_THE_FLY

    @property
    def name(self) -> str:
        """The group's name: its first member's qualified name (a group of one: the linear)."""
        return self.members[0].name


@dataclass(frozen=True)
class BlockSpec:
    """One transformer block, in call order over all stacks."""

    name: str                          # qualified, e.g. "blocks.3" or "single_transformer_blocks.0"
    index: int                         # global index in call order
    stack: str                         # e.g. "blocks", "transformer_blocks", "single_transformer_blocks"
    groups: tuple[SmoothGroup, ...]    # in processing order (prev_rows sources before their targets)

    @property
    def linears(self) -> tuple[LinearSpec, ...]:
        return tuple(m for g in self.groups for m in g.members)


@dataclass(frozen=True)
class TimestepInput:
    """Where the diffusion timestep enters the model (for step-dependent precision,
    ``quantization/step_precision.py``): the argument ``position`` (or keyword ``keyword``) of the
    call of submodule ``module`` ("" : the model itself), in units where the timestep range is
    ``range`` (DDPM's 1000 steps: 1000; Flux's transformer takes t in [0, 1]: 1)."""

    module: str = ""
    position: int | None = None
    keyword: str | None = None
    range: float = 1000.0

    def read(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The timestep of one call of ``module`` (None where the call lacks it)."""
        if self.keyword is not None and kwargs.get(self.keyword) is not None:
            return kwargs[self.keyword]
        if self.position is not None and len(args) > self.position:
            return args[self.position]
        return None


@dataclass
class BlockCall:
    """The positional and keyword arguments of one call of a block."""

    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)

    def detached(self) -> "BlockCall":
        """A copy whose tensors are detached clones (safe to keep across steps)."""
        return BlockCall(tuple(_detach(a) for a in self.args), {k: _detach(v) for k, v in self.kwargs.items()})


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, tuple):
        return tuple(_detach(x) for x in v)
    if isinstance(v, list):
        return [_detach(x) for x in v]
    if isinstance(v, dict):
        return {k: _detach(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class CalibrationSampler:
    """A class-conditional family seen as ditas' samplers need it, for its own calibration run.

    ``model``: ``forward(x, t, y)``, ``forward_with_cfg``, ``config.in_channels``/``input_size``/
    ``learn_sigma`` (the model itself for ditas' DiT, a view for diffusers' DiT); ``num_classes``:
    the label count (the null label for guidance is ``num_classes``); ``first_block``: whose calls
    are recorded; ``linear_prefix``: what the adapter's linear names need in front, seen from ``model``.
    """

    model: nn.Module
    num_classes: int
    first_block: nn.Module
    linear_prefix: str = ""


@dataclass
class CalibrationRecord:
    """What block-wise calibration needs: the first block's call at every recorded step.

    Returned by ``ditas.record_calibration`` (any code that calls the model) and by
    ``calibration.trajectory.self_calibration`` (DiT samples its own trajectory). ``key`` identifies the settings it
    was recorded with, when known (a DiT self-calibration checks it against the config).
    """

    calls: list[BlockCall]
    model_calls: int = 0
    wall_time_s: float = 0.0
    key: tuple | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # the generic adapter's view: the structure found by the probe (``generic_structure.py``, from
    # the first recorded model call) and the recorded calls of each block that starts a segment, by
    # name (``generic_calls.py``)
    structure: Any = None
    segments: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.calls)


# ----------------------------------------------------------------------------------------------
#                                     The adapter base class
# ----------------------------------------------------------------------------------------------


class ModelAdapter:
    """The family's knowledge. Subclasses are stateless apart from ``model``.

    Required: ``family``, ``matches``, ``blocks``, ``next_call``, ``model_config``, ``build``.
    Optional: ``weight_only_linears`` (default none), ``calibration_sampler`` (default none: a
    recording is needed), ``block_output_tensors`` (default: the output, or its tensors if a tuple).
    """

    family: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        self.model = model

    # -- identification ---------------------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter describes ``model`` (checked by ``registry.adapter_for``)."""
        raise NotImplementedError

    # -- structure --------------------------------------------------------------------------------
    def blocks(self) -> list[BlockSpec]:
        """Every block in call order, with its smoothing groups and their folds."""
        raise NotImplementedError

    def linears(self) -> list[LinearSpec]:
        """Every quantizable linear, in block order."""
        return [lin for b in self.blocks() for lin in b.linears]

    def weight_only_linears(self) -> list[str]:
        """Qualified names of the ``nn.Linear`` layers stored weight-only in int8 (adaLN modulation),
        converted after every fold is in them."""
        return []

    def attention_modules(self) -> list[nn.Module]:
        """The modules whose attention core ``quantization.attention.use_attention`` may replace
        (each has a ``core`` attribute, None for the default); none by default."""
        return []

    def block_module(self, spec: BlockSpec) -> nn.Module:
        return self.model.get_submodule(spec.name)

    # -- block-wise replay ------------------------------------------------------------------------
    def next_call(self, block: BlockSpec, call: BlockCall, output: Any) -> BlockCall:
        """The call of the block after ``block``, given ``block``'s call and output (handles the
        transition from one stack to the next)."""
        raise NotImplementedError

    def block_output_tensors(self, output: Any) -> list[torch.Tensor]:
        """The tensors of a block's output (checked to be finite during replay)."""
        if isinstance(output, torch.Tensor):
            return [output]
        if isinstance(output, (tuple, list)):
            return [t for t in output if isinstance(t, torch.Tensor)]
        return []

    def recorded_calls(self, block: BlockSpec, record: CalibrationRecord) -> Any:
        """The recorded FP calls ``block`` is calibrated on (a sequence of ``BlockCall``), where it
        starts a segment; None (the default for every block but the first): its calls are replayed
        from the previous block's (``next_call``)."""
        return None

    def report_info(self) -> dict[str, Any]:
        """What the report says about how the adapter saw the model (the generic adapter: the
        layers it leaves float and why, which blocks were replayed); nothing by default."""
        return {}

    def timestep_input(self) -> TimestepInput | None:
        """Where the timestep enters the model; None (the default): not known, so step-dependent
        precision (``QuantConfig.late``) is refused for the family."""
        return None

    # -- calibration without a recording ----------------------------------------------------------
    def calibration_sampler(self) -> CalibrationSampler | None:
        """The model as a class-conditional sampler of its own calibration run (class-conditional
        DiT: the calibration labels with their null label for guidance); None (the default): the
        family needs the user's pipeline, recorded with ``ditas.record_calibration``."""
        return None

    # -- checkpoints ------------------------------------------------------------------------------
    def model_config(self) -> dict[str, Any]:
        """A JSON-able description from which ``build`` makes the same (float) architecture."""
        raise NotImplementedError

    @classmethod
    def build(cls, config: dict[str, Any]) -> nn.Module:
        """An un-initialised model of the architecture ``config`` (called under the meta device)."""
        raise NotImplementedError

