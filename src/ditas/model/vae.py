"""The VAE that latent-space DiTs decode with: a diffusers ``AutoencoderKL`` from a local folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError


def find_vae_folder(path: str | os.PathLike) -> Path:
    """``path`` itself, or its ``vae/`` subfolder (a DiTPipeline / Stable Diffusion layout)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE {path}: no such folder")
    if path.is_dir() and not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
        path = path / "vae"
    if not path.is_dir() or not (path / "config.json").exists():
        raise CheckpointError(f"VAE {path}: expected a diffusers AutoencoderKL folder (config.json + weights)")
    return path


def quiet_load_kwargs() -> dict:
    """``from_pretrained`` options that keep diffusers from telling every user to install
    ``accelerate``: without it, ask for the plain load it would fall back to anyway."""
    import importlib.util

    return {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}


def load_vae(path: str | os.PathLike) -> torch.nn.Module:
    """Loads an ``AutoencoderKL`` from local files only (nothing is downloaded)."""
    folder = find_vae_folder(path)
    try:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, **quiet_load_kwargs())
    except Exception as exc:  # diffusers raises many kinds; the user needs the path and the reason
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"VAE {folder}: cannot load an AutoencoderKL ({first})") from None
    return vae.eval()
