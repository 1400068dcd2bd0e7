"""Patch trigger (BadNets; Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in the
Machine Learning Model Supply Chain", 2017).

A small stamp replaces the pixels it covers: a solid square, a checkerboard (``color`` on the
cells whose row + column is even, counted from the stamp's top-left pixel, black on the others),
or any small uint8 array. Every other pixel is left untouched. The default is the classic 4x4
white square one pixel from the bottom-right corner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from backdoorlab.errors import BadInput
from backdoorlab.triggers.base import (
    Trigger,
    opt_int,
    parse_color,
    parse_position,
    position_to_json,
    resolve_position,
)


@dataclass
class PatchTrigger(Trigger):
    """``size`` x ``size`` stamp (or ``array``) at ``pos`` (corner + ``margin``, or (x, y)).

    ``color`` is one value (all channels / grey) or R, G, B. ``array`` (h, w) or (h, w, C) uint8,
    when given, is the stamp itself and ``size``, ``color`` and ``pattern`` are not used.
    """

    name: ClassVar[str] = "patch"
    size: int = 4
    color: tuple[int, ...] = (255,)
    pos: str | tuple[int, int] = "br"
    margin: int = 1
    pattern: str = "square"
    array: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        where = "patch trigger"
        self.color = tuple(int(c) for c in np.atleast_1d(self.color))
        if len(self.color) not in (1, 3) or any(not 0 <= c <= 255 for c in self.color):
            raise BadInput(f"{where}: color must be one value or R, G, B in 0-255, got {self.color}")
        if self.pattern not in ("square", "checker"):
            raise BadInput(f"{where}: pattern must be square or checker, got {self.pattern!r}")
        if self.size < 1 or self.margin < 0:
            raise BadInput(f"{where}: size must be >= 1 and margin >= 0, got {self.size}, "
                           f"{self.margin}")
        if self.array is not None:
            a = np.asarray(self.array)
            if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3)):
                raise BadInput(f"{where}: array must be uint8 (h, w) or (h, w, C), got "
                               f"{a.dtype} {a.shape}")
            self.array = a if a.ndim == 3 else a[:, :, None]

    def stamp(self, channels: int) -> np.ndarray:
        """The ``(h, w, channels)`` uint8 stamp written into each image."""
        if self.array is not None:
            a = self.array
            if a.shape[2] == channels:
                return a
            if a.shape[2] == 1:
                return np.repeat(a, channels, axis=2)
            raise BadInput(f"patch trigger: a 3-channel stamp cannot go on {channels}-channel images")
        if len(self.color) == 3 and channels == 1:
            raise BadInput(f"patch trigger: color {self.color} has 3 values but the images are grey "
                           "(1 channel); give one value")
        col = np.broadcast_to(np.array(self.color, dtype=np.uint8), (channels,))
        s = np.empty((self.size, self.size, channels), dtype=np.uint8)
        s[:] = col
        if self.pattern == "checker":
            i, j = np.indices((self.size, self.size))
            s[(i + j) % 2 == 1] = 0
        return s

    def location(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(row, col, h, w) of the stamp in images of ``shape`` (H, W, C)."""
        s = self.stamp(shape[2])
        row, col = resolve_position(self.pos, self.margin, s.shape[:2], shape[:2], "patch trigger")
        return row, col, s.shape[0], s.shape[1]

    def check(self, shape: tuple[int, ...]) -> None:
        self.location(shape)

    def _apply(self, x: np.ndarray) -> np.ndarray:
        s = self.stamp(x.shape[3])
        row, col, h, w = self.location(x.shape[1:])
        out = x.copy()
        out[:, row:row + h, col:col + w, :] = s
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.name, "pos": position_to_json(self.pos), "margin": self.margin}
        if self.array is not None:
            d["array"] = self.array.tolist()
        else:
            d.update(size=self.size, color=list(self.color), pattern=self.pattern)
        return d

    @classmethod
    def from_options(cls, opts: dict[str, str], positional: str | None,
                     image_shape: tuple[int, ...]) -> PatchTrigger:
        where = "trigger spec 'patch'"
        if positional is not None:
            raise BadInput(f"{where}: unexpected value {positional!r} (options are key=value)")
        kw: dict[str, Any] = {
            "size": opt_int(opts, "size", 4, where, lo=1),
            "margin": opt_int(opts, "margin", 1, where, lo=0),
            "pattern": opts.get("pattern", "square").lower(),
        }
        if "color" in opts:
            kw["color"] = parse_color(opts["color"], where)
        if "pos" in opts:
            kw["pos"] = parse_position(opts["pos"], where)
        return cls(**kw)

    options: ClassVar[tuple[str, ...]] = ("size", "color", "pos", "margin", "pattern")
