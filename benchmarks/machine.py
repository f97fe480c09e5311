"""The machine a benchmark ran on, for the record: every speed table names its CPU."""

from __future__ import annotations

import subprocess


def cpu_name() -> str:
    """The CPU's model name as ``lscpu`` gives it ("unknown CPU" where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")),
                "unknown CPU")
