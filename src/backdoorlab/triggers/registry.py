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
    wanet:grid=4,strength=0.5,seed=0        WaNet warp (Nguyen & Tran 2021)
    sig:delta=20,freq=6                     SIG sinusoid, with clean-label poisoning (Barni et al. 2019)
    bpp:bits=3,dither=true                  BppAttack colour squeeze (Wang et al. 2022)
    lc:eps=16,amplitude=32                  label-consistent, with clean-label poisoning (Turner et al. 2019)
    adap-blend:cover_rate=0.1               Adaptive-Blend: partial noise blends, cover rows (Qi et al. 2023)
    adap-patch:cover_rate=0.2               Adaptive-Patch: one of 4 corner patches per row (Qi et al. 2023)
    input-aware:mask_density=0.032          input-aware dynamic (Nguyen & Tran 2020; `attack` only)

A comma-separated piece without ``=`` continues the previous value (so ``pos=2,5`` works); the
first such piece of ``image`` and ``blend`` specs names the picture file.

The registry is built from the modules of this package (`discover`): each trigger module defines
one `Trigger` subclass with a ``name``, an ``options`` tuple and ``from_options``. Triggers whose
options are an ``Options`` dataclass (`backdoorlab.options.opt` fields) read them with
`spec_options`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from backdoorlab.errors import BadInput
from backdoorlab.triggers.base import Trigger

_FIRST = ("patch", "image", "blend", "ftrojan")  # listed first, in this order; the others by name
_NOT_TRIGGERS = ("base", "registry", "stack")
_FILE_KINDS = ("image", "blend")


def discover() -> dict[str, type]:
    """Every trigger class of the modules of this package, by its ``name``.

    A trigger class is a `Trigger` subclass defined in that module (not imported into it) with a
    ``from_options`` class method and an ``options`` tuple; adding a trigger is adding one module.
    Two classes with one name are a programming error (RuntimeError)."""
    found: dict[str, type] = {}
    package = __name__.rpartition(".")[0]
    for mod in pkgutil.iter_modules([str(Path(__file__).resolve().parent)]):
        if mod.ispkg or mod.name.startswith("_") or not mod.name.isidentifier() or \
                mod.name in _NOT_TRIGGERS:
            continue
        module = importlib.import_module(f"{package}.{mod.name}")
        for obj in vars(module).values():
            if not (isinstance(obj, type) and issubclass(obj, Trigger) and obj is not Trigger
                    and obj.__module__ == module.__name__ and callable(getattr(obj, "from_options", None))
                    and isinstance(getattr(obj, "options", None), tuple)):
                continue
            kind = str(obj.name).lower()
            if kind in found and found[kind] is not obj:
                raise RuntimeError(f"two trigger classes are named {kind!r}: "
                                   f"{found[kind].__module__}.{found[kind].__name__} and "
                                   f"{obj.__module__}.{obj.__name__}")
            found[kind] = obj
    order = [k for k in _FIRST if k in found] + sorted(k for k in found if k not in _FIRST)
    return {k: found[k] for k in order}


TRIGGERS: dict[str, type] = discover()


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


def spec_options(options_cls: type, opts: Mapping[str, str], kind: str, where: str | None = None) -> Any:
    """A trigger's ``Options`` dataclass from the string values of its spec, each converted to its
    field's type (whole numbers, numbers, true/false) and checked against its bounds and choices
    (`BadInput` naming the spec — or ``where`` — and the option). Any method's options read from
    ``KEY=VALUE`` text the same way."""
    from backdoorlab.options import from_mapping, infos

    where = where or f"trigger spec {kind!r}"
    values: dict[str, Any] = {}
    known = {i.name: i for i in infos(options_cls)}
    for key, raw in opts.items():
        info = known.get(key)
        if info is None:  # parse_spec refuses these first; kept for direct callers
            raise BadInput(f"{where}: unknown option {key!r} (known: {', '.join(known)})")
        text = raw.strip()
        if info.type is bool:
            low = text.lower()
            if low not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                raise BadInput(f"{where}: {key} must be true or false, got {raw!r}")
            values[key] = low in ("true", "yes", "on", "1")
        elif info.type is int:
            try:
                values[key] = int(text)
            except ValueError:
                raise BadInput(f"{where}: {key} must be a whole number, got {raw!r}") from None
        elif info.type is float:
            try:
                values[key] = float(text)
            except ValueError:
                raise BadInput(f"{where}: {key} must be a number, got {raw!r}") from None
        else:
            values[key] = text
    return from_mapping(options_cls, values, where)
