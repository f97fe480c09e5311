"""The oldest torch and diffusers ditas is tested with, checked once, in one line.

Why: ditas uses APIs that older releases lack (``torch.library.custom_op``, ``nn.Module.set_submodule``,
diffusers' quantizer hooks and the ``torch.accelerator`` module its recent releases import). An older
version used to fail minutes into the work with a raw traceback; now ``import ditas`` (torch) and
every command (both) stop at once and say what to install. The floors are the versions the test
suite ran on (constraints.txt); pyproject.toml asks for the same.
"""

from __future__ import annotations

from importlib import metadata

from .errors import DitasError

MIN_VERSIONS = {"torch": (2, 13), "diffusers": (0, 42)}


def _release(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> (2, 13, 0); pre-release and local parts are ignored."""
    import re

    parts = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d*", piece).group(0)  # leading digits: "0rc1" -> 0
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):
            break
    return tuple(parts)


def version_problem(name: str, installed: str | None) -> str | None:
    """What is wrong with ``installed`` as ``name``'s version (None: it is new enough)."""
    need = MIN_VERSIONS[name]
    floor = ".".join(map(str, need))
    if installed is None:
        return f"ditas needs {name}>={floor}, which is not installed: pip install '{name}>={floor}'"
    if _release(installed) < need:
        return (f"ditas needs {name}>={floor} (the oldest version its tests ran on), found {installed}: "
                f"pip install -U '{name}>={floor}'")
    return None


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_versions(*names: str) -> None:
    """A one-line ``DitasError`` for the first of ``names`` (default: all) that is too old or missing."""
    for name in names or tuple(MIN_VERSIONS):
        problem = version_problem(name, installed_version(name))
        if problem:
            raise DitasError(problem)
