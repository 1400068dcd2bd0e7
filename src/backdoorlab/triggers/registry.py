"""Trigger specs as typed on the command line, and the registry that turns them into triggers.

A spec is ``KIND`` or ``KIND:OPTIONS``; options are ``key=value`` separated by commas, e.g.

    patch                                   4x4 white square, bottom-right, margin 1
    patch:size=3,color=255;0;0,pos=tl,pattern=checker
    patch:pos=2,5                           top-left pixel at x=2 (column), y=5 (row)
    image:glasses.png,scale=0.5,pos=10,12,alpha=0.8
    blend:alpha=0.1,seed=0                  seeded uniform noise
    blend:kitty.png,alpha=0.2
    ftrojan:preset=gtsrb
    ftrojan:channels=cr;cb,pos=31;31|15;15,magnitude=20,window=32,space=ycrcb

A comma-separated piece without ``=`` continues the previous value (so ``pos=2,5`` works); the
first such piece of ``image`` and ``blend`` specs names the picture file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from backdoorlab.errors import BadInput
from backdoorlab.triggers.base import Trigger
from backdoorlab.triggers.blend import BlendTrigger
from backdoorlab.triggers.ftrojan import FTrojanTrigger
from backdoorlab.triggers.image import ImageTrigger
from backdoorlab.triggers.patch import PatchTrigger

TRIGGERS: dict[str, type] = {
    "patch": PatchTrigger,
    "image": ImageTrigger,
    "blend": BlendTrigger,
    "ftrojan": FTrojanTrigger,
}
_FILE_KINDS = ("image", "blend")


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """``"blend:kitty.png,alpha=0.2"`` -> ``("blend", "kitty.png", {"alpha": "0.2"})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise BadInput("trigger spec is empty (expected e.g. patch, blend:alpha=0.1 or ftrojan)")
    kind, _, rest = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in TRIGGERS:
        raise BadInput(f"trigger spec {spec!r}: unknown kind {kind!r} (known: {', '.join(TRIGGERS)})")
    cls = TRIGGERS[kind]
    positional: str | None = None
    opts: dict[str, str] = {}
    last: str | None = None
    for piece in rest.split(",") if rest else []:
        key, eq, value = piece.partition("=")
        key = key.strip().lower()
        if (eq and kind in _FILE_KINDS and positional is None and not opts and key not in cls.options
                and Path(piece.strip()).is_file()):  # a file name that contains '='
            positional, eq = piece.strip(), ""
            continue
        if eq and key in cls.options:
            if key in opts:
                raise BadInput(f"trigger spec {spec!r}: option {key!r} given twice")
            opts[key] = value.strip()
            last = key
        elif eq:
            raise BadInput(f"trigger spec {spec!r}: unknown option {key!r} for {kind} "
                           f"(known: {', '.join(cls.options)})")
        elif last is not None:
            opts[last] += "," + piece.strip()
        elif positional is None and kind in _FILE_KINDS and piece.strip():
            positional = piece.strip()
            last = None
        else:
            raise BadInput(f"trigger spec {spec!r}: cannot read {piece!r} (expected key=value)")
    return kind, positional, opts


def make_trigger(spec: str, image_shape: tuple[int, ...]) -> Trigger:
    """Build the trigger a CLI ``spec`` describes for images of ``image_shape`` (H, W, C).

    Raises BadInput for unknown kinds or options, unreadable values, files that cannot be read,
    or a trigger that does not fit the image shape.
    """
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or shape[2] not in (1, 3) or min(shape) < 1:
        raise BadInput(f"trigger: image shape must be (H, W, C) with C = 1 or 3, got {image_shape}")
    kind, positional, opts = parse_spec(spec)
    build: Callable[..., Trigger] = TRIGGERS[kind].from_options
    trigger = build(opts, positional, shape)
    try:
        trigger.check(shape)
        if kind == "patch":
            trigger.stamp(shape[2])  # type: ignore[attr-defined]
    except BadInput as e:
        raise BadInput(f"trigger spec {spec!r}: {e}") from None
    return trigger
