"""The architectures, each a `StagedNet`, and the registry that builds them by name.

- ``deepid``: the CSAW-HackML-2020 DeepID (Sun et al., CVPR 2014 style; 55×47×3, layer names and
  Keras flatten order exactly as the CSAW Keras model).
- ``gtsrb_cnn``: the 6-conv CNN of the FTrojan experiments (Wang et al., ECCV 2022) on 32×32 GTSRB
  and CIFAR-10: three blocks of two 3×3 conv-BN-ReLU layers (32, 64, 128) with 2×2 max pooling.
- ``preact_resnet18``: pre-activation ResNet-18 (He et al., ECCV 2016), CIFAR-style stem.
- ``small_cnn``: two conv layers, for the embedded digits and for tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from backdoorlab.errors import BadInput
from backdoorlab.models.layers import Conv2dAct, ConvBNAct, KerasFlatten, LinearAct
from backdoorlab.models.staged import StagedNet


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


def deepid(num_classes: int = 1283, input_shape: tuple[int, int, int] = (55, 47, 3)) -> StagedNet:
    h, w, c = input_shape
    h3, w3 = (((h - 3) // 2 - 2) // 2 - 2) // 2, (((w - 3) // 2 - 2) // 2 - 2) // 2
    return StagedNet([
        ("conv_1", Conv2dAct(c, 20, 4)), ("pool_1", nn.MaxPool2d(2)),
        ("conv_2", Conv2dAct(20, 40, 3)), ("pool_2", nn.MaxPool2d(2)),
        ("conv_3", Conv2dAct(40, 60, 3)), ("pool_3", nn.MaxPool2d(2)),
        ("head", DeepIDHead(num_classes, 60, h3, w3)),
    ], prune_layer="conv_3", prune_point="pool_3")


def gtsrb_cnn(num_classes: int = 43, input_shape: tuple[int, int, int] = (32, 32, 3)) -> StagedNet:
    h, w, c = input_shape
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
    key = ALIASES.get(name, name)
    if key not in ARCHITECTURES:
        known = ", ".join(sorted(set(ARCHITECTURES) | set(ALIASES)))
        raise BadInput(f"unknown architecture {name!r} (known: {known})")
    return ARCHITECTURES[key](num_classes=num_classes, input_shape=tuple(input_shape), **options)


def canonical(name: str) -> str:
    return ALIASES.get(name, name)
