"""Building a model skeleton whose parameters take no memory, while its buffers stay real.

``torch.device("meta")`` puts buffers on the meta device too; models that compute a
non-persistent buffer in ``__init__`` (diffusers' sin-cos position embedding) would lose it. Here
each parameter is moved to meta as soon as it is registered (the accelerate technique), so only
parameters are empty; ``load_state_dict(..., assign=True)`` then puts the loaded tensors in place.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def empty_parameters() -> Iterator[None]:
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
