"""Where the computation runs (``--device``) and at what precision (``--precision``).

One place owns the device: a `Classifier` knows where its network lives (``clf.device``) and at
which precision it computes (``clf.precision``); images stay uint8 on the host and move to the
device one batch at a time (`Classifier.to_tensor`, pinned memory on CUDA). Algorithms create
their tensors on ``clf.device`` and run the network inside ``clf.autocast()``; none of them calls
``.cuda()``. Random draws that must not depend on the device (permutations, crops, random starts)
come from CPU generators (``torch.Generator()`` marked ``# CPU-only``) and move to the device
afterwards; a tensor reaches numpy through ``.cpu()``. ``tests/test_device_guard.py`` checks these rules on
the source, so a GPU-only mistake fails on a CPU-only machine too.

Devices: ``auto`` (CUDA, then Apple's MPS, then the CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
Precisions: ``fp32`` (the default; numbers on the CPU are those of every earlier release),
``bf16`` and ``fp16`` — autocast, so the weights stay fp32 and only the operations autocast
lists (convolutions, matrix products) run at the lower precision. ``fp16`` needs a GPU (CPU
autocast to fp16 is slow and loses range); on the CPU use ``bf16``.

Reproducibility: on the CPU a seed gives the same numbers run after run. On CUDA, cuDNN picks
convolution algorithms per shape and some kernels (atomic adds in backward passes, index_add)
are not deterministic, so trained weights and scan results may differ in the last digits between
runs; ``torch.use_deterministic_algorithms(True)`` would trade speed for bit-reproducibility and
is not set here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from backdoorlab.errors import BadInput

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The `torch.device` for ``name`` (see the module docstring); a device that is not on this
    machine → `BadInput` naming what is there."""
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise BadInput("--device mps: no Apple MPS device on this machine "
                           "(torch.backends.mps.is_available() is False); use --device cpu")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise BadInput(f"--device {name}: expected cuda or cuda:N with N a GPU number")
        if not torch.cuda.is_available():
            raise BadInput(f"--device {name}: no CUDA device on this machine "
                           "(torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise BadInput(f"--device {name}: this machine has {count} CUDA device(s), "
                           f"numbered 0..{count - 1}")
        return torch.device(text)
    raise BadInput(f"--device {name!r}: expected one of {', '.join(DEVICES)}")


def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` if it can run on ``device``, else `BadInput`."""
    p = (precision or "fp32").strip().lower()
    if p not in PRECISIONS:
        raise BadInput(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if p == "fp16" and device.type == "cpu":
        raise BadInput("--precision fp16 needs a GPU (CPU autocast to fp16 is slow and loses range); "
                       "use --precision bf16 on the CPU")
    return p


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast to ``precision`` on ``device`` (fp32: nothing changes)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
        yield


def describe(device: torch.device, precision: str) -> str:
    """One line for the first line of a command's output, e.g. ``device: cpu (fp32)``."""
    name = str(device)
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            name += f" ({torch.cuda.get_device_name(device)})"
    return f"device: {name}, precision {precision}"


def gpu_count(device: str | None) -> int:
    """GPUs a cell on ``device`` asks a scheduler for (1 on CUDA, else 0); ``auto`` counts as CUDA
    when this machine has one."""
    text = (device or "cpu").strip().lower()
    if text.startswith("cuda"):
        return 1
    return int(text == "auto" and torch.cuda.is_available())
