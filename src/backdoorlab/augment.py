"""Training-time augmentations on uint8 NHWC torch batches (no torchvision)."""

from __future__ import annotations

import torch


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to size at a random offset per image."""
    if padding <= 0:
        return x
    n, h, w, c = x.shape
    padded = torch.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=x.dtype)
    padded[:, padding:padding + h, padding:padding + w] = x
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (n, w)
    idx_n = torch.arange(n)[:, None, None]
    return padded[idx_n, rows[:, :, None], cols[:, None, :]]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    if flip.any():
        x = x.clone()
        x[flip] = x[flip].flip(2)
    return x


def augment(x: torch.Tensor, gen: torch.Generator, crop_padding: int = 0,
            flip: bool = False) -> torch.Tensor:
    if crop_padding:
        x = random_crop(x, crop_padding, gen)
    if flip:
        x = random_flip(x, gen)
    return x
