"""scikit-learn's bundled handwritten digits (8×8, 1,797 images): the embedded default data.

Read from the copy that ships inside scikit-learn, so nothing is downloaded. Pixels (0-16) are
scaled to 0-255 and nearest-neighbour upscaled by an integer factor (``size``) so that patch
triggers and convolutional nets have room to work.
"""

from __future__ import annotations

import numpy as np

from backdoorlab.data.imageset import ImageSet


def load_digits(size: int = 16, rgb: bool = False) -> ImageSet:
    """Return all 1,797 digits as an ImageSet of ``size``×``size`` images (10 classes)."""
    from sklearn.datasets import load_digits as _sk_load

    bunch = _sk_load()
    x = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    factor = max(1, size // 8)
    if factor > 1:
        x = x.repeat(factor, axis=1).repeat(factor, axis=2)
    x = x[..., None]
    if rgb:
        x = np.repeat(x, 3, axis=3)
    return ImageSet(np.ascontiguousarray(x), bunch.target.astype(np.int64), 10, name="digits",
                    class_names=[str(i) for i in range(10)])
