"""Data: the `ImageSet` and one reader per on-disk format, chosen by detection.

``load_dataset("gtsrb:/path/GTSRB", split="test")`` or ``load_dataset("/path/file.h5")``;
``"digits"`` is the embedded default (scikit-learn's bundled digits).
"""

from __future__ import annotations

from backdoorlab.data.detect import FORMATS, detect_format, load_dataset, parse_source
from backdoorlab.data.imageset import ImageSet

__all__ = ["FORMATS", "ImageSet", "detect_format", "load_dataset", "parse_source"]
