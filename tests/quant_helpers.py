"""Small models shared by the quantization tests (not a test module)."""

from __future__ import annotations

import torch

from ditas import DiT, DiTConfig


def random_dit(seed: int = 0, in_channels: int = 1, hidden: int = 64, depth: int = 2, heads: int = 4,
               input_size: int = 8, num_classes: int = 10) -> DiT:
    """A small DiT whose adaLN and output layers are non-zero (the published init zeroes them,
    which would make every block the identity)."""
    torch.manual_seed(seed)
    m = DiT(DiTConfig(input_size=input_size, patch_size=2, in_channels=in_channels, hidden_size=hidden,
                      depth=depth, num_heads=heads, num_classes=num_classes))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.normal_(0, 0.05)
            elif name.endswith("bias") and "blocks" in name:
                p.normal_(0, 0.05)
        # outlier input channels, as trained transformers have
        for b in m.blocks:
            b.attn.qkv.weight[:, :3] *= 4
            b.mlp.fc2.weight[:, :5] *= 3
    return m.eval()
