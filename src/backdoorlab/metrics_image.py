"""Image-quality metrics for triggers: PSNR and SSIM between clean and poisoned uint8 images.

PSNR (peak signal-to-noise ratio, dB) = 10 log10(255^2 / MSE), MSE over all pixels and channels of
an image; identical images give +inf. Higher means less visible (about 35-40 dB and above is hard
to see).

SSIM (Wang, Bovik, Sheikh & Simoncelli, "Image Quality Assessment: From Error Visibility to
Structural Similarity", IEEE TIP 2004) with the paper's settings: an 11x11 Gaussian window with
sigma 1.5, K1 = 0.01, K2 = 0.03, dynamic range 255, local statistics computed per channel only where
the window fits entirely inside the image ("valid" region), then averaged over positions and
channels. 1 means identical.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from backdoorlab.errors import BadInput

_PEAK = 255.0


def _pair(a: np.ndarray, b: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise BadInput(f"{where}: image batches differ in shape, {a.shape} vs {b.shape}")
    if a.ndim == 3:  # one image (H, W, C)
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise BadInput(f"{where}: expected images (N, H, W, C) or (H, W, C), got shape {a.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise BadInput(f"{where}: expected uint8 images, got {a.dtype} and {b.dtype}")
    return a, b


def mse_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean squared error per image (float64, on the 0-255 scale)."""
    a, b = _pair(a, b, "MSE")
    out = np.empty(len(a))
    for i in range(0, len(a), 1024):
        d = a[i:i + 1024].astype(np.float64) - b[i:i + 1024]
        out[i:i + 1024] = np.mean(d * d, axis=(1, 2, 3))
    return out


def psnr_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB per image (inf where the two images are identical)."""
    mse = mse_per_image(a, b)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(_PEAK * _PEAK / mse)


def psnr_mean(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the per-image PSNR (inf if any pair is identical)."""
    return float(np.mean(psnr_per_image(a, b)))


def psnr_batch(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of the whole batch (one MSE pooled over every pixel of every image)."""
    mse = float(np.mean(mse_per_image(a, b)))
    return float(10.0 * np.log10(_PEAK * _PEAK / mse)) if mse > 0 else float("inf")


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """1-D Gaussian weights summing to 1 (the 2-D window is their outer product)."""
    r = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(r * r) / (2.0 * sigma * sigma))
    return g / g.sum()


def ssim_per_image(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5,
                   chunk: int = 256) -> np.ndarray:
    """Mean SSIM per image (float64), Wang et al. 2004 settings (see module docstring)."""
    from scipy.ndimage import correlate1d

    a, b = _pair(a, b, "SSIM")
    h, w = a.shape[1:3]
    if h < window or w < window:
        raise BadInput(f"SSIM: images of {h}x{w} are smaller than the {window}x{window} window")
    g = gaussian_window(window, sigma)
    half = window // 2
    c1, c2 = (0.01 * _PEAK) ** 2, (0.03 * _PEAK) ** 2

    def blur(z: np.ndarray) -> np.ndarray:  # valid-region Gaussian filtering over H and W
        z = correlate1d(z, g, axis=1, mode="constant")[:, half:h - half]
        return correlate1d(z, g, axis=2, mode="constant")[:, :, half:w - half]

    out = np.empty(len(a))
    for i in range(0, len(a), chunk):
        x = a[i:i + chunk].astype(np.float64)
        y = b[i:i + chunk].astype(np.float64)
        mx, my = blur(x), blur(y)
        sxx = blur(x * x) - mx * mx
        syy = blur(y * y) - my * my
        sxy = blur(x * y) - mx * my
        smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        out[i:i + chunk] = smap.mean(axis=(1, 2, 3))
    return out


def ssim_mean(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the per-image SSIM."""
    return float(np.mean(ssim_per_image(a, b)))


@dataclass
class ImageQuality:
    """How visible a trigger is: figures over ``count`` image pairs.

    ``psnr_mean`` averages the per-image PSNR over the ``changed`` pairs (identical pairs have
    infinite PSNR and are left out; None when no image changed); ``psnr_batch`` pools the MSE of
    all pairs; ``ssim_mean`` averages per-image SSIM over all pairs (None for images smaller than
    the SSIM window).
    """

    count: int
    changed: int
    psnr_mean: float | None
    psnr_batch: float | None
    ssim_mean: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def image_quality(clean: np.ndarray, poisoned: np.ndarray, ssim: bool = True) -> ImageQuality:
    """PSNR/SSIM summary of ``poisoned`` against ``clean`` (same shapes, uint8)."""
    mse = mse_per_image(clean, poisoned)
    changed = mse > 0
    psnr = 10.0 * np.log10(_PEAK * _PEAK / mse[changed]) if changed.any() else None
    s = None
    if ssim and len(mse) and min(np.shape(clean)[-3:-1]) >= 11:
        s = ssim_mean(clean, poisoned)
    return ImageQuality(
        count=int(len(mse)), changed=int(changed.sum()),
        psnr_mean=float(psnr.mean()) if psnr is not None else None,
        psnr_batch=float(10.0 * np.log10(_PEAK * _PEAK / mse.mean())) if changed.any() else None,
        ssim_mean=s,
    )
