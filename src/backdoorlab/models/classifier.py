"""`Classifier`: a network plus everything needed to use it correctly on uint8 images."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from backdoorlab import cost
from backdoorlab.errors import BadInput
from backdoorlab.models.spec import InputSpec


def pixel_factor(images: np.ndarray | torch.Tensor, where: str = "images") -> float:
    """The factor (1 or 255) that brings ``images`` to the 0-255 pixel scale, by the input rule:

    - ``uint8``: pixels 0-255 (factor 1, nothing is scanned);
    - floating point, every value in [0, 1]: pixels/255, the usual PyTorch/Keras input (255);
    - floating point or integer, every value in [0, 255] and some above 1: raw pixels (1); an
      integer array is always raw pixels;
    - anything else (a negative value, NaN or infinity, a value above 255, bool, complex or
      object arrays): `BadInput`, one line.

    The rule looks at the whole array, so every batch of one call is read the same way. An
    all-dark float image in [0, 1] is read as pixels/255: pass uint8 to be unambiguous."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return 1.0
        floating = images.dtype.is_floating_point
        integer = not floating and not images.dtype.is_complex and images.dtype != torch.bool
        empty = images.numel() == 0
    else:
        if images.dtype == np.uint8:
            return 1.0
        floating, integer = images.dtype.kind == "f", images.dtype.kind in "iu"
        empty = images.size == 0
    if not (floating or integer):
        raise BadInput(f"{where}: unsupported pixel type {images.dtype} (expected uint8, or numbers "
                       "in [0, 1] (pixels/255) or [0, 255] (raw pixels))")
    if empty:
        return 1.0
    lo, hi = float(images.min()) + 0.0, float(images.max()) + 0.0  # + 0.0: no "-0" in messages
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise BadInput(f"{where}: pixel values contain NaN or infinity")
    if lo < 0 or hi > 255:
        raise BadInput(f"{where}: pixel values must lie in [0, 1] (pixels/255) or [0, 255] (raw "
                       f"pixels), found {lo:g}..{hi:g}")
    return 255.0 if floating and hi <= 1.0 else 1.0


def _as_array(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().cpu().numpy()
    return images if isinstance(images, np.ndarray) else np.asarray(images)


@dataclass
class Classifier:
    """A network (``net``, taking the tensor ``spec`` describes and returning logits) with its
    input spec, class count, architecture name/options (to rebuild it from a weights file) and
    free-form provenance. ``net`` may be any ``nn.Module``; staged networks additionally allow
    running up to / from a named layer (see `StagedNet`).

    Images are NHWC. Every method that takes images (`to_tensor`, `logits`, `predict`,
    `activations`) reads them by one rule (`pixel_factor`): uint8 as pixels 0-255, floats all in
    [0, 1] as pixels/255, floats in [0, 255] with some value above 1 as raw pixels; anything else
    is refused with `BadInput`. The network's own `InputSpec` (raw or unit scale, mean/std) is
    then applied to the pixels, so a [0, 1] float array gives the same answer as its uint8
    original whatever scale the network was trained on.

    ``device`` is where ``net`` lives and ``precision`` the autocast precision of its passes
    (`backdoorlab.device`; CPU and fp32 by default): `to` moves the network, `to_tensor` moves each
    batch, `logits` / `activations` return host arrays, and algorithms run the network inside
    `autocast` on tensors they create on ``device``."""

    net: nn.Module
    spec: InputSpec
    num_classes: int
    arch: str = "custom"
    arch_options: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    channels_last: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"

    def __post_init__(self) -> None:
        setattr(self.net, cost.TOP, True)  # image passes are counted at this network's input
        self.net.eval()
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    # -- device and precision ---------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, precision: str | None = None) -> Classifier:
        """Move the network to ``device`` and/or set the ``precision`` (in place; returns self)."""
        from backdoorlab.device import check_precision, resolve_device

        if device is not None:
            self.device = resolve_device(device)
            self.net.to(self.device)
        if precision is not None or device is not None:
            self.precision = check_precision(precision or self.precision, self.device)
        return self

    def autocast(self):
        """The context in which to run ``net``: autocast to ``precision`` on ``device``."""
        from backdoorlab.device import autocast

        return autocast(self.device, self.precision)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Eval mode and no parameter gradients inside the block, both restored afterwards: for
        methods that optimise inputs against a fixed network (Neural Cleanse, MM-BD, ABS)."""
        flags = [(p, p.requires_grad) for p in self.net.parameters()]
        was_training = self.net.training
        self.net.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, f in flags:
                p.requires_grad_(f)
            self.net.train(was_training)

    # -- conversion -------------------------------------------------------------------------
    def to_tensor(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """NHWC images (uint8, or numbers read by `pixel_factor`) → the float tensor ``net``
        expects (scale, mean/std, layout)."""
        return self._tensor(images, pixel_factor(images))

    def _tensor(self, images: np.ndarray | torch.Tensor, factor: float) -> torch.Tensor:
        if self.device.type != "cpu":  # the batch travels as it is (uint8: 4x less to copy)
            t = torch.as_tensor(images)
            if self.device.type == "cuda" and t.device.type == "cpu":
                t = t.pin_memory()
            images = t.to(self.device, non_blocking=True)
        if factor != 1.0:
            images = torch.as_tensor(images).to(torch.float32) * factor
        return self.spec.to_tensor(images, channels_last=self.channels_last)

    def _checked(self, images) -> tuple[np.ndarray, float]:
        """(images as an array, its `pixel_factor`), shape and values checked before any pass."""
        images = _as_array(images)
        self.spec.check(images)
        return images, pixel_factor(images)

    # -- inference --------------------------------------------------------------------------
    def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits ``(N, num_classes)`` for NHWC images (see the class docstring for the pixel
        rule), in eval mode without autograd."""
        images, factor = self._checked(images)
        self.net.eval()
        out = np.empty((len(images), self.num_classes), dtype=np.float32)
        with torch.inference_mode(), self.autocast():
            for i in range(0, len(images), batch_size):
                y = self.net(self._tensor(images[i:i + batch_size], factor))
                out[i:i + len(y)] = y.float().cpu().numpy()
        return out

    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Predicted class per image (int64); images as for `logits`."""
        return self.logits(images, batch_size).argmax(axis=1).astype(np.int64)

    # -- layers -----------------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        """Short names of the named layers (stages and the layers nested in them); for an imported
        Keras graph, its layers' Keras names."""
        keras = getattr(self.net, "keys", None)
        if isinstance(keras, dict):
            return list(keras)
        names: list[str] = []
        for full, _ in self.net.named_modules():
            if not full:
                continue
            short = full.split(".")[-1]
            if full.startswith("stages.") or not hasattr(self.net, "stages"):
                if short not in names and not short.isdigit():
                    names.append(short)
        return names

    def layer(self, name: str) -> nn.Module:
        """The module called ``name`` (a short name such as ``conv_3``, a dotted path, or the Keras
        name of a layer of an imported Keras graph, dots included)."""
        keras = getattr(self.net, "keys", None)
        if isinstance(keras, dict) and name in keras:
            return self.net.module(name)
        modules = dict(self.net.named_modules())
        for key in (name, f"stages.{name}"):
            if key in modules and key:
                return modules[key]
        hits = [m for full, m in modules.items() if full.split(".")[-1] == name]
        if len(hits) == 1:
            return hits[0]
        raise BadInput(f"unknown layer {name!r} (layers: {', '.join(self.layer_names())})")

    def activations(self, images: np.ndarray, layer: str, batch_size: int = 256) -> np.ndarray:
        """Output of layer ``layer`` for every image (images as for `logits`), as a float32
        array."""
        module = self.layer(layer)
        images, factor = self._checked(images)
        captured: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
        chunks = []
        try:
            with torch.inference_mode(), self.autocast():
                for i in range(0, len(images), batch_size):
                    captured.clear()
                    self.net(self._tensor(images[i:i + batch_size], factor))
                    chunks.append(captured[-1].contiguous().float().cpu().numpy())
        finally:
            handle.remove()
        return np.concatenate(chunks) if chunks else np.empty((0,), dtype=np.float32)

    @property
    def staged(self) -> bool:
        return hasattr(self.net, "forward_to") and hasattr(self.net, "forward_from")

    def default_prune_layer(self) -> tuple[str, str]:
        """(layer to prune, stage at which it is measured), e.g. ("conv_3", "pool_3")."""
        layer = getattr(self.net, "prune_layer", "")
        if not layer:
            raise BadInput(f"architecture {self.arch!r} names no default pruning layer; pass --layer")
        return layer, getattr(self.net, "prune_point", layer) or layer

    def copy(self) -> Classifier:
        """An independent deep copy (network weights, options and provenance)."""
        import copy

        return Classifier(copy.deepcopy(self.net), self.spec, self.num_classes, self.arch,
                          copy.deepcopy(self.arch_options), copy.deepcopy(self.provenance),
                          self.channels_last, self.device, self.precision)

    def with_scale(self, scale: str) -> Classifier:
        """The same network with another input scale (``raw`` or ``unit``)."""
        return Classifier(self.net, self.spec.with_scale(scale), self.num_classes, self.arch,
                          dict(self.arch_options), dict(self.provenance), self.channels_last,
                          self.device, self.precision)

    def describe(self) -> str:
        n_params = sum(p.numel() for p in self.net.parameters())
        h, w, c = self.spec.shape
        return (f"{self.arch}: {self.num_classes} classes, input {h}x{w}x{c} "
                f"({self.spec.scale} pixels), {n_params:,} parameters")
