"""A domain evaluator for digit samples: a small CNN classifier and the metrics built on it.

The classifier (``assets/digit_classifier``) is trained on the bundled real MNIST digits minus
the held-out ``test`` split (the last 50 digits of every class, see ``ditas.data.digits``).
For class-conditional samples it gives:

- ``class_accuracy``: how often the classifier recognises the requested class;
- ``fid``: the Fréchet distance between sample features and real-digit features in the
  classifier's penultimate (128-d) feature space, a domain analogue of FID;
- ``precision`` / ``recall``: Kynkäänniemi et al.'s k-NN manifold metrics (k = 3) in that space.

Reference features come from the held-out ``test`` split (500 digits, 50 per class) by default:
like the samples, those digits were never seen by the classifier, so the two feature sets are
comparable (the classifier's features of its own training digits are tighter than of any new
image). ``reference="all"`` uses all 5,000 digits instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.digits import IMAGE_SIZE, NUM_CLASSES, load_digits
from ..errors import CheckpointError, DitasError
from ..fileio import atomic_dir
from .metrics import frechet_distance, precision_recall

DEFAULT_CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "assets" / "digit_classifier"
REFERENCE_SPLITS = ("test", "all")


# ----------------------------------------------------------------------------------------------
#                                       The classifier
# ----------------------------------------------------------------------------------------------


@dataclass
class ClassifierConfig:
    channels: tuple[int, int, int] = (32, 64, 128)
    feature_dim: int = 128
    num_classes: int = NUM_CLASSES
    image_size: int = IMAGE_SIZE

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) != 3 or min(self.channels) < 1 or self.feature_dim < 1:
            raise ValueError(f"invalid classifier config: {self}")
        if self.image_size % 8:
            raise ValueError("classifier image_size must be a multiple of 8 (three 2x poolings)")


class DigitClassifier(nn.Module):
    """Three conv-BN-ReLU-pool stages, a ``feature_dim`` ReLU layer (the features), a linear head.

    Input: (N, 1, 32, 32) floats in [0, 1] (pixel / 255, background 0).
    """

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        c1, c2, c3 = config.channels
        layers: list[nn.Module] = []
        prev = 1
        for c in (c1, c2, c3):
            layers += [nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            prev = c
        self.conv = nn.Sequential(*layers)
        spatial = config.image_size // 8
        self.fc = nn.Linear(c3 * spatial * spatial, config.feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate activations: what the Fréchet distance and precision/recall use."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def _random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translates every image by up to ``max_shift`` pixels (background fill), for augmentation."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, 1, h, padded.shape[3])
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, 1, h, w)
    out = padded.gather(2, rows)
    return out.gather(3, cols)


def train_digit_classifier(epochs: int = 12, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                           test_per_class: int = 50, max_shift: int = 2,
                           config: ClassifierConfig | None = None) -> tuple[DigitClassifier, dict[str, Any]]:
    """Trains the classifier on the train split; returns it (eval mode) and a training report."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    train = load_digits("train", test_per_class)
    test = load_digits("test", test_per_class)
    x = torch.from_numpy(train.images).float().div(255).unsqueeze(1)
    y = torch.from_numpy(train.labels)
    model = DigitClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = len(x) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(_random_shift(x[idx], max_shift, g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    train_acc = float((predict(model, train.rgb()) == train.labels).mean())
    test_acc = float((predict(model, test.rgb()) == test.labels).mean())
    report = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "max_shift": max_shift,
              "train_images": len(train), "test_images": len(test), "test_split": f"last {test_per_class} per class",
              "train_accuracy": train_acc, "test_accuracy": test_acc,
              "wall_time_s": round(time.perf_counter() - start, 1)}
    return model, report


# ----------------------------------------------------------------------------------------------
#                                     Saving and loading
# ----------------------------------------------------------------------------------------------


def save_classifier(model: DigitClassifier, path: str | Path, report: dict[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """A folder: ``config.json`` (architecture + training report) and ``model.safetensors``."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_dir(path, "ditas-digit-classifier", overwrite=overwrite) as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        cfg = asdict(model.config)
        cfg["channels"] = list(cfg["channels"])
        (tmp / "config.json").write_text(json.dumps(
            {"format": "ditas-digit-classifier", "classifier": cfg, "training": report or {}}, indent=2))
    return path


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """Loads a saved classifier (default: the shipped one) in eval mode, without executing code."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_CLASSIFIER_DIR
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise CheckpointError(f"{path}: a digit classifier folder needs config.json and model.safetensors")
    from ..readers import Field, read_json

    data = read_json(cfg_file, "digit classifier config", {"classifier": Field(dict)}, error=CheckpointError)
    try:
        config = ClassifierConfig(**data["classifier"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_file}: not a digit classifier config ({exc})") from None
    model = DigitClassifier(config)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"{weights}: does not match the classifier config ({exc})") from None
    return model.eval()


# ----------------------------------------------------------------------------------------------
#                                          Evaluation
# ----------------------------------------------------------------------------------------------


def images_to_input(images: np.ndarray, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 (N, H, W, 3|1) or (N, H, W) images -> (N, 1, H, W) floats in [0, 1] (channel mean)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DitasError(f"expected images of shape (N, H, W, 3) or (N, H, W, 1), got {images.shape}")
    if images.shape[1:3] != (image_size, image_size):
        raise DitasError(f"the digit evaluator needs {image_size}x{image_size} images, got "
                         f"{images.shape[1]}x{images.shape[2]}")
    if images.shape[0] == 0:
        raise DitasError("no images to evaluate")
    if images.dtype != np.uint8:
        raise DitasError(f"expected uint8 images (as decode_to_uint8 writes), got {images.dtype}")
    x = torch.from_numpy(images.astype(np.float32)).mean(dim=-1, keepdim=True)
    return x.permute(0, 3, 1, 2).div_(255.0).contiguous()


@torch.no_grad()
def _run(model: DigitClassifier, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    x = images_to_input(images, model.config.image_size)
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i:i + batch_size])
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(feats).numpy().astype(np.float64), torch.cat(logits).numpy()


def predict(model: DigitClassifier, images: np.ndarray) -> np.ndarray:
    return _run(model, images)[1].argmax(axis=1)


def extract_features(model: DigitClassifier, images: np.ndarray) -> np.ndarray:
    return _run(model, images)[0]


def reference_features(model: DigitClassifier, reference: str = "test") -> np.ndarray:
    if reference not in REFERENCE_SPLITS:
        raise DitasError(f"unknown reference split {reference!r}; choose one of {', '.join(REFERENCE_SPLITS)}")
    return extract_features(model, load_digits(reference).rgb())


def evaluate_digit_samples(images: np.ndarray, labels, classifier: DigitClassifier | None = None,
                           reference: str = "test", k: int = 3, other: np.ndarray | None = None) -> dict[str, Any]:
    """Class accuracy, domain Fréchet distance, precision and recall of labelled digit samples.

    With ``other`` (e.g. the FP model's samples), also ``fid_vs_other``: the Fréchet distance in
    the same feature space between ``images`` and ``other``, i.e. how far a quantized model's
    sample distribution moved from the FP model's, rather than how far it is from real digits.
    """
    labels = np.asarray(labels)
    images = np.asarray(images)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DitasError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if len(labels) != len(images):
        raise DitasError(f"{len(images)} images but {len(labels)} labels")
    model = classifier if classifier is not None else load_classifier()
    if labels.size and (labels.min() < 0 or labels.max() >= model.config.num_classes):
        raise DitasError(f"labels must lie in 0..{model.config.num_classes - 1}")
    feats, logits = _run(model, images)
    if len(feats) <= k:
        raise DitasError(f"the evaluator needs more than {k} images, got {len(feats)}")
    ref = reference_features(model, reference)
    pred = logits.argmax(axis=1)
    correct = pred == labels
    per_class = {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)}
    precision, recall = precision_recall(ref, feats, k=k)
    out_other = {}
    if other is not None:
        out_other["fid_vs_other"] = frechet_distance(feats, _run(model, np.asarray(other))[0])
    return {
        **out_other,
        "num_samples": int(len(labels)),
        "num_ref": int(len(ref)),
        "class_accuracy": float(correct.mean()),
        "per_class_accuracy": per_class,
        "fid": frechet_distance(feats, ref),
        "precision": precision,
        "recall": recall,
        "k": k,
        "reference": f"{reference} split of the bundled MNIST digits ({len(ref)} images)",
        "feature_dim": int(feats.shape[1]),
    }
