"""Image trigger with an alpha mask: a picture (e.g. sunglasses, a sticker) pasted at an offset.

This is the physical-accessory style of trigger of Chen et al. ("Targeted Backdoor Attacks on Deep
Learning Systems Using Data Poisoning", 2017, accessory injection) and of the CSAW-HackML
sunglasses BadNet. Per pixel under the picture,

    out = a * trigger + (1 - a) * image,   a = (A / 255) * alpha,

with ``A`` the picture's alpha channel (255 where it has none) and ``alpha`` a global opacity in
[0, 1]; the result is rounded to the nearest integer (ties to even). Pixels outside the picture are
untouched. The picture may be resized by ``scale`` (Pillow, bicubic on premultiplied alpha). The
picture file and its scaled size are bounded like every image read (`backdoorlab.safe_read`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from backdoorlab.errors import BadInput
from backdoorlab.safe_read import check_pixels
from backdoorlab.triggers.base import (
    Trigger,
    load_picture,
    opt_float,
    opt_int,
    parse_position,
    position_to_json,
    resolve_position,
    to_uint8,
)


@dataclass
class ImageTrigger(Trigger):
    """Paste ``rgba`` (h, w, 4) uint8 (colour + alpha) at ``pos`` with global ``alpha``.

    On grey images the colour is reduced to luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B).
    """

    name: ClassVar[str] = "image"
    rgba: np.ndarray = field(repr=False)
    pos: str | tuple[int, int] = "br"
    margin: int = 0
    alpha: float = 1.0
    source: str = ""  # file the picture came from (recorded in to_dict)
    scale: float = 1.0  # resize factor already applied to ``rgba`` (recorded only)

    def __post_init__(self) -> None:
        a = np.asarray(self.rgba)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 4 or a.shape[0] < 1 or a.shape[1] < 1:
            raise BadInput(f"image trigger: picture must be uint8 (h, w, 4) RGBA, got {a.dtype} "
                           f"{a.shape}")
        if not 0.0 <= self.alpha <= 1.0:
            raise BadInput(f"image trigger: alpha must be in [0, 1], got {self.alpha}")
        self.rgba = a

    @classmethod
    def from_file(cls, path: str, scale: float = 1.0, pos: str | tuple[int, int] = "br",
                  margin: int = 0, alpha: float = 1.0) -> ImageTrigger:
        """Read a picture (PNG with transparency, or any Pillow format) and optionally resize it."""
        where = "image trigger"
        im = load_picture(path, where).convert("RGBA")
        if scale != 1.0:
            from PIL import Image

            w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
            check_pixels(w, h, f"{where}: {path!r} scaled by {scale:g}")
            im = im.resize((w, h), Image.Resampling.BICUBIC)
        return cls(rgba=np.asarray(im, dtype=np.uint8).copy(), pos=pos, margin=margin, alpha=alpha,
                   source=str(path), scale=scale)

    def layers(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(colour (h, w, channels) float32, opacity a (h, w, 1) float32) of the picture."""
        rgb = self.rgba[:, :, :3].astype(np.float32)
        if channels == 1:
            rgb = rgb @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
        a = (self.rgba[:, :, 3:4].astype(np.float32) / np.float32(255.0)) * np.float32(self.alpha)
        return rgb, a

    def location(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return resolve_position(self.pos, self.margin, self.rgba.shape[:2], shape[:2], "image trigger")

    def check(self, shape: tuple[int, ...]) -> None:
        self.location(shape)

    def _apply(self, x: np.ndarray) -> np.ndarray:
        row, col = self.location(x.shape[1:])
        h, w = self.rgba.shape[:2]
        rgb, a = self.layers(x.shape[3])
        out = x.copy()
        region = x[:, row:row + h, col:col + w, :].astype(np.float32)
        out[:, row:row + h, col:col + w, :] = to_uint8(a * rgb + (1.0 - a) * region)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.name, "file": self.source, "size": list(self.rgba.shape[:2]),
                "scale": self.scale, "pos": position_to_json(self.pos), "margin": self.margin,
                "alpha": self.alpha}

    @classmethod
    def from_options(cls, opts: dict[str, str], positional: str | None,
                     image_shape: tuple[int, ...]) -> ImageTrigger:
        where = "trigger spec 'image'"
        path = positional or opts.get("file")
        if not path:
            raise BadInput(f"{where}: name the picture, e.g. image:sunglasses.png,pos=0,0")
        return cls.from_file(
            path,
            scale=opt_float(opts, "scale", 1.0, where, lo=1e-3),
            pos=parse_position(opts["pos"], where) if "pos" in opts else "br",
            margin=opt_int(opts, "margin", 0, where, lo=0),
            alpha=opt_float(opts, "alpha", 1.0, where, lo=0.0, hi=1.0),
        )

    options: ClassVar[tuple[str, ...]] = ("file", "scale", "pos", "margin", "alpha")
