"""The architectures, each a `StagedNet`, and the registry that builds them by name.

- ``deepid``: the CSAW-HackML-2020 DeepID (Sun et al., CVPR 2014 style; 55×47×3, layer names and
  Keras flatten order exactly as the CSAW Keras model).
- ``gtsrb_cnn``: the 6-conv CNN of the FTrojan experiments (Wang et al., ECCV 2022) on 32×32 GTSRB
  and CIFAR-10: three blocks of two 3×3 conv-BN-ReLU layers (32, 64, 128) with 2×2 max pooling.
- ``preact_resnet18``: pre-activation ResNet-18 (He et al., ECCV 2016), CIFAR-style stem.
- ``small_cnn``: two conv layers, for the embedded digits and for tests.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import torch
from torch import nn

from backdoorlab.errors import BadInput
from backdoorlab.models.layers import Conv2dAct, ConvBNAct, KerasFlatten, LinearAct
from backdoorlab.models.staged import StagedNet
from backdoorlab.safe_read import MAX_CLASSES, MAX_DIM, MAX_ELEMENTS, check_int


class DeepIDHead(nn.Module):
    """DeepID's two branches after pool_3: flatten→fc_1 and conv_4→flatten→fc_2, added, ReLU."""

    def __init__(self, num_classes: int, c3: int = 60, h3: int = 5, w3: int = 4):
        super().__init__()
        self.flatten = KerasFlatten()
        self.fc_1 = LinearAct(c3 * h3 * w3, 160)
        self.conv_4 = Conv2dAct(c3, 80, 2, act="relu")
        self.fc_2 = LinearAct(80 * (h3 - 1) * (w3 - 1), 160)
        self.output = LinearAct(160, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.fc_1(self.flatten(x))
        b = self.fc_2(self.flatten(self.conv_4(x)))
        return self.output(torch.relu(a + b))


def _min_size(name: str, input_shape: tuple[int, int, int], h: int, w: int) -> None:
    if input_shape[0] < h or input_shape[1] < w:
        raise BadInput(f"architecture {name!r} needs inputs of at least {h}x{w} pixels, got "
                       f"{input_shape[0]}x{input_shape[1]}")


def deepid(num_classes: int = 1283, input_shape: tuple[int, int, int] = (55, 47, 3)) -> StagedNet:
    h, w, c = input_shape
    _min_size("deepid", input_shape, 31, 31)  # pool_3 must leave 2x2 for conv_4
    h3, w3 = (((h - 3) // 2 - 2) // 2 - 2) // 2, (((w - 3) // 2 - 2) // 2 - 2) // 2
    return StagedNet([
        ("conv_1", Conv2dAct(c, 20, 4)), ("pool_1", nn.MaxPool2d(2)),
        ("conv_2", Conv2dAct(20, 40, 3)), ("pool_2", nn.MaxPool2d(2)),
        ("conv_3", Conv2dAct(40, 60, 3)), ("pool_3", nn.MaxPool2d(2)),
        ("head", DeepIDHead(num_classes, 60, h3, w3)),
    ], prune_layer="conv_3", prune_point="pool_3")


def gtsrb_cnn(num_classes: int = 43, input_shape: tuple[int, int, int] = (32, 32, 3)) -> StagedNet:
    h, w, c = input_shape
    _min_size("gtsrb_cnn", input_shape, 8, 8)  # three 2x2 poolings
    return StagedNet([
        ("conv_1", ConvBNAct(c, 32)), ("conv_2", ConvBNAct(32, 32)), ("pool_1", nn.MaxPool2d(2)),
        ("conv_3", ConvBNAct(32, 64)), ("conv_4", ConvBNAct(64, 64)), ("pool_2", nn.MaxPool2d(2)),
        ("conv_5", ConvBNAct(64, 128)), ("conv_6", ConvBNAct(128, 128)),
        ("pool_3", nn.MaxPool2d(2)),
        ("flatten", KerasFlatten()),
        ("fc_1", LinearAct(128 * (h // 8) * (w // 8), 256, act="relu")),
        ("dropout", nn.Dropout(0.3)),
        ("output", LinearAct(256, num_classes)),
    ], prune_layer="conv_6", prune_point="pool_3")


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class PreActFinal(nn.Module):
    """The final BN + ReLU after layer4 (the pruning point of PreAct-ResNet18)."""

    def __init__(self, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(x))


def preact_resnet18(num_classes: int = 10,
                    input_shape: tuple[int, int, int] = (32, 32, 3)) -> StagedNet:
    h, w, c = input_shape
    stages: list[tuple[str, nn.Module]] = [("stem", nn.Conv2d(c, 64, 3, 1, 1, bias=False))]
    cin = 64
    for i, (cout, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
        stages.append((f"layer{i}", nn.Sequential(PreActBlock(cin, cout, stride),
                                                  PreActBlock(cout, cout, 1))))
        cin = cout
    stages += [("final", PreActFinal(512)), ("pool", nn.AdaptiveAvgPool2d(1)),
               ("flatten", nn.Flatten()), ("output", nn.Linear(512, num_classes))]
    return StagedNet(stages, prune_layer="layer4", prune_point="final")


def small_cnn(num_classes: int = 10, input_shape: tuple[int, int, int] = (16, 16, 1)) -> StagedNet:
    h, w, c = input_shape
    _min_size("small_cnn", input_shape, 4, 4)  # two 2x2 poolings
    return StagedNet([
        ("conv_1", Conv2dAct(c, 16, 3, padding=1)), ("pool_1", nn.MaxPool2d(2)),
        ("conv_2", Conv2dAct(16, 32, 3, padding=1)), ("pool_2", nn.MaxPool2d(2)),
        ("flatten", KerasFlatten()),
        ("fc_1", LinearAct(32 * (h // 4) * (w // 4), 64, act="relu")),
        ("output", LinearAct(64, num_classes)),
    ], prune_layer="conv_2", prune_point="pool_2")


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "deepid": deepid,
    "gtsrb_cnn": gtsrb_cnn,
    "preact_resnet18": preact_resnet18,
    "small_cnn": small_cnn,
}
ALIASES = {"ftrojan_cnn": "gtsrb_cnn", "cifar_cnn": "gtsrb_cnn", "resnet18": "preact_resnet18"}


def register(name: str, builder: Callable[..., nn.Module]) -> None:
    """Add an architecture (``builder(num_classes, input_shape, **options) -> nn.Module``)."""
    ARCHITECTURES[name] = builder


def build(name: str, num_classes: int, input_shape: tuple[int, int, int], **options) -> nn.Module:
    """Build architecture ``name`` for ``input_shape`` (H, W, C) and ``num_classes``.

    Sizes are checked before anything is allocated (BadInput otherwise): the class count is a whole
    number in 1..10^6, the input dims whole numbers in 1..4096, ``options`` are parameters the builder
    takes, and, built first on torch's meta device (shapes only, no memory), the network holds at most
    2^28 parameters in any layer and in all. Each builder refuses an input too small for its pooling.
    """
    key = canonical(name)
    if key not in ARCHITECTURES:
        raise BadInput(f"unknown architecture {name!r} (known: {known_text()})")
    builder, where = ARCHITECTURES[key], f"architecture {name!r}"
    num_classes = check_int(num_classes, f"{where}: class count", 1, MAX_CLASSES)
    shape = check_shape(input_shape, where)
    params = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        takes = set(params) - {"num_classes", "input_shape"}
        unknown = sorted(map(str, set(options) - takes))
        if unknown:
            raise BadInput(f"{where}: unknown option(s) {', '.join(unknown)} (it takes: "
                           f"{', '.join(sorted(takes)) or 'none'})")

    def make() -> nn.Module:
        try:
            with warnings.catch_warnings():  # torch warns about zero-size layers; refused below
                warnings.simplefilter("ignore")
                return builder(num_classes=num_classes, input_shape=shape, **options)
        except (RuntimeError, ValueError, TypeError, ZeroDivisionError) as e:
            raise BadInput(f"{where} cannot be built for input {shape} with {num_classes} classes "
                           f"({_first_line(e)})") from None

    with torch.device("meta"):
        check_size(make(), where)
    return make()


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def check_shape(shape, where: str) -> tuple[int, int, int]:
    """``shape`` as (H, W, C) of whole numbers in 1..``MAX_DIM``; BadInput otherwise."""
    if not isinstance(shape, tuple | list) or len(shape) != 3:
        raise BadInput(f"{where}: input shape must be (height, width, channels), got {shape!r}")
    return tuple(check_int(v, f"{where}: input {d}", 1, MAX_DIM)  # type: ignore[return-value]
                 for d, v in zip(("height", "width", "channels"), shape, strict=True))


def check_size(net: nn.Module, where: str) -> None:
    """Refuse a network (best built on the meta device: nothing allocated) with a layer or a total
    above ``MAX_ELEMENTS`` parameters."""
    total = 0
    for lname, m in net.named_modules():
        own = sum(p.numel() for p in m.parameters(recurse=False))
        if own > MAX_ELEMENTS:
            raise BadInput(f"{where}: layer {lname!r} would hold {own:,} parameters (at most "
                           f"{MAX_ELEMENTS:,} are accepted)")
        total += own
    if total > MAX_ELEMENTS:
        raise BadInput(f"{where}: {total:,} parameters (at most {MAX_ELEMENTS:,} are accepted)")


def canonical(name: str) -> str:
    """The registered name of ``name``: case and ``-``/``_`` do not matter (``DeepID`` = ``deepid``,
    ``preact-resnet18`` = ``preact_resnet18``), aliases map to what they build."""
    key = str(name).strip().lower().replace("-", "_")
    return ALIASES.get(key, key)


def known_text() -> str:
    """Every architecture name `build` accepts, for error messages (one list everywhere)."""
    return ", ".join(sorted(set(ARCHITECTURES) | set(ALIASES)))
