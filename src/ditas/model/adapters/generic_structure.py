"""What the structure probe finds about a model, as plain frozen data: its blocks, each block's
smoothing groups and roles, its modulation linears, the transition into it (how its call is made
from the previous block's call and output) and the linears left float with the reason.

It holds no tensors and no hooks: the description is kept on the model (``STRUCTURE_ATTR``) and
read by the generic adapter (``generic.py``) and every verb's ``adapter_for``, which so need
none of the probe's machinery (``generic_probe.py`` finds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import BlockCall


@dataclass(frozen=True)
class Source:
    """Where one argument of a block's call comes from: ``out`` (element ``key`` of the previous
    block's output; None: the output itself), ``arg`` / ``kwarg`` (the previous block's own
    argument ``key``), ``const`` (the value ``key``)."""

    kind: str
    key: Any = None


@dataclass(frozen=True)
class Transition:
    """How block ``i + 1``'s call is made from block ``i``'s call and output."""

    args: tuple[Source, ...]
    kwargs: tuple[tuple[str, Source], ...]

    def apply(self, call: BlockCall, output: Any) -> BlockCall:
        outs = _output_items(output)

        def pick(src: Source) -> Any:
            if src.kind == "out":
                return output if src.key is None else outs[src.key]
            if src.kind == "arg":
                return call.args[src.key]
            if src.kind == "kwarg":
                return call.kwargs[src.key]
            return src.key

        return BlockCall(tuple(pick(s) for s in self.args), {k: pick(s) for k, s in self.kwargs})


@dataclass(frozen=True)
class GenericBlock:
    """One block as the probe saw it: its groups ``((member rels, role), ...)`` in call order,
    its modulation linears (weight-only), and the transition INTO it (None: a segment start,
    ``why`` says why)."""

    name: str
    stack: str
    groups: tuple[tuple[tuple[str, ...], str], ...]
    weight_only: tuple[str, ...] = ()
    transition: Transition | None = None
    why: str = ""
    folds: tuple[tuple[str, str, tuple[int, int]], ...] = ()  # (group's first rel, target rel, rows)


@dataclass(frozen=True)
class GenericStructure:
    """Everything the generic adapter knows about a model (no tensors: kept on the model)."""

    model_class: str
    blocks: tuple[GenericBlock, ...]
    not_quantized: tuple[tuple[str, str], ...] = ()

    @property
    def segment_starts(self) -> list[str]:
        return [b.name for b in self.blocks if b.transition is None]


def _output_items(output: Any) -> list:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return list(output)
    return []
