"""Which device ditas computes on: ``--device`` / ``device=`` resolved and checked once.

``None`` or ``"auto"`` means CUDA when torch sees a CUDA device, else the CPU. ``"cpu"``,
``"cuda"`` and ``"cuda:N"`` are accepted; a device that is not there is a one-line
``DitasError`` raised before any work starts.
"""

from __future__ import annotations

import re

import torch

from .errors import DitasError

_PATTERN = re.compile(r"^(auto|cpu|cuda(?::[0-9]+)?)\Z")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device for ``device`` (see the module docstring); raises DitasError if absent."""
    if isinstance(device, torch.device):
        device = str(device)
    name = "auto" if device is None else str(device).strip().lower()
    if not _PATTERN.match(name):
        raise DitasError(f"--device {_short(repr(device))} is not understood; use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):  # checked before torch.device, which overflows on a huge index
        if not torch.cuda.is_available():
            raise DitasError(f"--device {_short(name)}: no CUDA device is available here (this torch "
                             f"{torch.__version__} sees none); use --device cpu")
        index = name.partition(":")[2]
        if index and int(index) >= torch.cuda.device_count():
            raise DitasError(f"--device {_short(name)}: only {torch.cuda.device_count()} CUDA device(s) here "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return torch.device(name)


def _short(name: str, limit: int = 40) -> str:
    """A device name cut to ``limit`` characters for a one-line message."""
    return name if len(name) <= limit else name[:limit] + "..."


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda or cuda:N (default auto: cuda if available, else cpu); under torchrun "
                             "each process takes cuda:LOCAL_RANK")
