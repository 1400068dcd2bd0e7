"""Keras models rebuilt from their JSON config as a torch graph (`KerasGraph`), with no TensorFlow.

A full-model Keras HDF5 file (``model.save("x.h5")`` in Keras 2 or 3) carries its architecture as a
JSON string in the ``model_config`` attribute. That JSON is *parsed*, never executed: only the layer
classes in `SUPPORTED` are accepted; a Lambda or custom layer (which would carry code) is refused.
Both config dialects are read: Keras 2 (``inbound_nodes`` as ``[[name, node, tensor, kwargs]]``
lists, ``batch_input_shape``) and Keras 3 (``inbound_nodes`` as ``{"args": [...__keras_tensor__...]}``
dicts, ``batch_shape``), functional models and Sequential ones (Keras 2.2.4 wrote a Sequential config
as a bare list of layers without an InputLayer; a ``<first layer>_input`` node stands in for it).
Keras 3's ``model.save("x.h5")`` still writes the legacy layout: the ``model_config`` attribute
(Keras 3 dialect) and a ``model_weights`` group with ``layer_names`` and per-layer ``weight_names``
(``conv/kernel``, without Keras 2's ``:0``), plus an unlisted ``top_level_model_weights`` group.

Keras tensors are (N, H, W, C); inside the graph they are NCHW, so channel axes are remapped
(Concatenate / BatchNormalization axis -1 → dim 1) and Flatten uses Keras' (H, W, C) order
(`KerasFlatten`), which keeps Dense kernels valid unchanged. A softmax on the model's final layer is
dropped: every network in this package returns logits.

The parsed config ("options", JSON-able) is stored as the ``arch_options`` of the Classifier, so a
`KerasGraph` saves and loads like any other architecture (``files.SPECIAL_BUILDERS["keras_graph"]``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backdoorlab.errors import BadInput
from backdoorlab.models import files
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.layers import KerasFlatten, activate
from backdoorlab.models.spec import InputSpec
from backdoorlab.safe_read import MAX_DIM, MAX_ELEMENTS

MAX_LAYERS = 2048  # layers of one graph (the checks below are quadratic in it)
MAX_ACTIVATIONS = 1 << 26  # values one layer outputs per image
OPTIONS_FORMAT = "keras-graph"
OPTIONS_VERSION = 1

SUPPORTED = ("InputLayer", "Conv2D", "MaxPooling2D", "AveragePooling2D", "Flatten", "Dense", "Add",
             "Concatenate", "Activation", "ReLU", "Dropout", "BatchNormalization",
             "GlobalAveragePooling2D", "GlobalMaxPooling2D")
ALIASES = {"Convolution2D": "Conv2D", "MaxPool2D": "MaxPooling2D", "AvgPool2D": "AveragePooling2D",
           "AveragePooling2D": "AveragePooling2D", "GlobalAvgPool2D": "GlobalAveragePooling2D",
           "GlobalMaxPool2D": "GlobalMaxPooling2D"}
CODE_LAYERS = ("Lambda", "TFOpLambda", "SlicingOpLambda")
ACTIVATIONS = ("linear", "relu", "softmax", "sigmoid", "tanh", "elu", "selu", "softplus", "softsign",
               "swish", "silu", "relu6", "exponential")
POOLS = ("MaxPooling2D", "AveragePooling2D")
# layers that map a zero channel to a zero channel, one channel at a time (see `KerasGraph`)
_ZERO_PRESERVING = ("Dropout", "MaxPooling2D", "AveragePooling2D")


# ---------------------------------------------------------------------------------------------
# config parsing (JSON → options)
# ---------------------------------------------------------------------------------------------
def parse_keras_config(config: str | bytes | dict, where: str = "model_config") -> dict:
    """Turn a Keras ``model_config`` (JSON text or dict) into graph options (JSON-able dict).

    Options: ``{"format", "version", "name", "input", "output", "dropped_softmax", "nodes": [{"name",
    "class", "inputs", "config", "synthetic"?}]}`` with nodes in a topological order.
    """
    if isinstance(config, bytes):
        config = config.decode("utf-8", errors="replace")
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except (json.JSONDecodeError, RecursionError) as e:
            raise BadInput(f"{where}: model_config is not valid JSON ({e})") from None
    try:
        return _parse(config, where)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, RecursionError) as e:
        raise BadInput(f"{where}: malformed model_config ({type(e).__name__}: {e})") from None


def _parse(config: Any, where: str) -> dict:
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str):
        raise BadInput(f"{where}: model_config is not a Keras model description")
    kind = config["class_name"]
    body = config.get("config")
    if kind in ("Functional", "Model"):
        if not isinstance(body, dict) or not isinstance(body.get("layers"), list):
            raise BadInput(f"{where}: functional model_config without a 'layers' list")
        nodes, inp, out = _parse_functional(body, where)
    elif kind == "Sequential":
        nodes, inp, out = _parse_sequential(body, where)
    else:
        raise BadInput(f"{where}: model class {kind!r} is not supported (expected a functional "
                       f"Model or a Sequential model)")
    name = body.get("name", "model") if isinstance(body, dict) else "model"
    _check_count(nodes, where)
    nodes = _toposort(nodes, inp, out, where)
    dropped = _drop_final_softmax(nodes, out)
    return {"format": OPTIONS_FORMAT, "version": OPTIONS_VERSION, "name": str(name), "input": inp,
            "output": out, "dropped_softmax": dropped, "nodes": nodes}


def _check_count(nodes: list[dict], where: str) -> None:
    if len(nodes) > MAX_LAYERS or sum(len(n["inputs"]) for n in nodes) > 4 * MAX_LAYERS:
        raise BadInput(f"{where}: {len(nodes):,} layers and {sum(len(n['inputs']) for n in nodes):,} "
                       f"connections; at most {MAX_LAYERS} layers and {4 * MAX_LAYERS} connections are "
                       "supported")


def _check_options(options: dict, where: str) -> None:
    """Re-validate stored graph options (a sidecar is as untrusted as a Keras file): every node must
    be what `_node` makes of it, and the graph must pass `_toposort`."""
    nodes = options["nodes"]
    if not all(isinstance(n, dict) for n in nodes):
        raise BadInput(f"{where}: malformed node list")
    for n in nodes:
        name, cfg, inputs = n.get("name"), n.get("config"), n.get("inputs")
        if not isinstance(name, str) or not isinstance(inputs, list) or not isinstance(cfg, dict) or \
                not all(isinstance(i, str) for i in inputs):
            raise BadInput(f"{where}: malformed node {str(n)[:80]}")
    _check_count(nodes, where)
    for n in nodes:
        cfg = {"shape": n["config"].get("shape")} if n.get("class") == "InputLayer" else n["config"]
        if _node({"class_name": n.get("class"), "config": cfg}, n["name"], n["inputs"], where) != \
                {k: n[k] for k in ("name", "class", "inputs", "config")}:
            raise BadInput(f"{where}: layer {n['name']!r}: stored options are not a valid layer")
    for key in ("input", "output"):
        if not isinstance(options.get(key), str):
            raise BadInput(f"{where}: no {key} layer")
    _toposort(nodes, options["input"], options["output"], where)


def _params(node: dict, s: tuple, where: str) -> int:
    """Parameter count of one node given its input shape ``s``; refused above ``MAX_ELEMENTS``."""
    cls, cfg, c = node["class"], node["config"], (s[-1] if s else 0)
    n = {"Conv2D": lambda: math.prod(cfg["kernel_size"]) * c * cfg["filters"] + cfg["filters"],
         "Dense": lambda: c * cfg["units"] + cfg["units"],
         "BatchNormalization": lambda: 4 * c}.get(cls, lambda: 0)()
    if n > MAX_ELEMENTS:
        raise BadInput(f"{where}: layer {node['name']!r} ({cls}) would hold {n:,} parameters (at most "
                       f"{MAX_ELEMENTS:,} are accepted)")
    return n


def _layer_name(layer: dict, where: str) -> str:
    cfg = layer.get("config") if isinstance(layer.get("config"), dict) else {}
    name = layer.get("name", cfg.get("name"))
    if not isinstance(name, str) or not name:
        raise BadInput(f"{where}: a layer of class {layer.get('class_name')!r} has no name")
    return name


def _parse_functional(body: dict, where: str) -> tuple[list[dict], str, str]:
    nodes = []
    for layer in body["layers"]:
        if not isinstance(layer, dict):
            raise BadInput(f"{where}: malformed layer entry {str(layer)[:60]!r}")
        name = _layer_name(layer, where)
        inbound = layer.get("inbound_nodes") or []
        if not isinstance(inbound, list):
            raise BadInput(f"{where}: layer {name!r}: malformed inbound_nodes")
        if len(inbound) > 1:
            raise BadInput(f"{where}: layer {name!r} is called {len(inbound)} times (a shared layer); "
                           f"only layers applied once are supported")
        inputs = _inbound(inbound[0], name, where) if inbound else []
        nodes.append(_node(layer, name, inputs, where))
    inp = _single_endpoint(body.get("input_layers"), "input", where)
    out = _single_endpoint(body.get("output_layers"), "output", where)
    return nodes, inp, out


def _inbound(node: Any, name: str, where: str) -> list[str]:
    """Names of the layers feeding one call of a layer (Keras 2 list or Keras 3 dict form)."""
    refs: list[list] = []
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        _collect_tensors(node.get("args", []), refs)
        kw: list[list] = []
        _collect_tensors(node.get("kwargs", {}), kw)
        if kw:
            raise BadInput(f"{where}: layer {name!r} takes tensors as keyword arguments; not supported")
    elif isinstance(node, list):  # Keras 2: [[layer, node_index, tensor_index, kwargs], ...]
        for ref in node:
            if not isinstance(ref, list) or len(ref) < 3 or not isinstance(ref[0], str):
                raise BadInput(f"{where}: layer {name!r}: malformed inbound node {str(ref)[:60]!r}")
            refs.append(ref[:3])
    else:
        raise BadInput(f"{where}: layer {name!r}: malformed inbound node")
    out = []
    for src, node_index, tensor_index in refs:
        if node_index != 0 or tensor_index != 0:
            raise BadInput(f"{where}: layer {name!r} reads output {tensor_index} of call {node_index} of "
                           f"{src!r}; only single-output layers applied once are supported")
        out.append(src)
    if not out:
        raise BadInput(f"{where}: layer {name!r} has no input tensor")
    return out


def _collect_tensors(obj: Any, refs: list[list]) -> None:
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            hist = (obj.get("config") or {}).get("keras_history")
            if not isinstance(hist, list) or len(hist) != 3 or not isinstance(hist[0], str):
                raise BadInput(f"model_config: malformed keras tensor reference {str(obj)[:80]!r}")
            refs.append(hist)
            return
        for v in obj.values():
            _collect_tensors(v, refs)
    elif isinstance(obj, list):
        for v in obj:
            _collect_tensors(v, refs)


def _single_endpoint(spec: Any, what: str, where: str) -> str:
    if isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str):
        return spec[0]
    if isinstance(spec, list) and len(spec) == 1 and isinstance(spec[0], list) and spec[0] \
            and isinstance(spec[0][0], str):
        return spec[0][0]
    if isinstance(spec, list) and len(spec) > 1:
        raise BadInput(f"{where}: the model has {len(spec)} {what}s; only single-{what} models are "
                       f"supported")
    raise BadInput(f"{where}: model_config names no {what} layer")


def _parse_sequential(body: Any, where: str) -> tuple[list[dict], str, str]:
    layers = body if isinstance(body, list) else (body or {}).get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, dict) for x in layers):
        raise BadInput(f"{where}: Sequential model_config without layers")
    nodes: list[dict] = []
    first = layers[0]
    if first.get("class_name") != "InputLayer":
        cfg = first.get("config") if isinstance(first.get("config"), dict) else {}
        shape = cfg.get("batch_input_shape") or cfg.get("batch_shape")
        if shape is None and isinstance(body, dict):
            shape = body.get("build_input_shape")
        if shape is None:
            raise BadInput(f"{where}: Sequential model without an input shape")
        name = f"{_layer_name(first, where)}_input"
        nodes.append({"name": name, "class": "InputLayer", "inputs": [],
                      "config": {"shape": _input_shape(shape, name, where)}, "synthetic": True})
    prev = nodes[0]["name"] if nodes else None
    for layer in layers:
        name = _layer_name(layer, where)
        nodes.append(_node(layer, name, [] if prev is None else [prev], where))
        prev = name
    return nodes, nodes[0]["name"], nodes[-1]["name"]


def _unsupported(name: str, cls: str, where: str) -> BadInput:
    return BadInput(f"{where}: layer {name!r} ({cls}) is not supported: model files are data, never "
                    f"code (supported layers: {', '.join(SUPPORTED)})")


def _node(layer: dict, name: str, inputs: list[str], where: str) -> dict:
    cls = layer.get("class_name")
    if not isinstance(cls, str):
        raise BadInput(f"{where}: layer {name!r} has no class_name")
    module = layer.get("module")
    custom = layer.get("registered_name") not in (None, cls) or (
        isinstance(module, str) and not module.startswith("keras"))
    cls_std = ALIASES.get(cls, cls)
    if cls in CODE_LAYERS or custom or cls_std not in SUPPORTED:
        raise _unsupported(name, cls, where)
    cfg = layer.get("config")
    if not isinstance(cfg, dict):
        raise BadInput(f"{where}: layer {name!r} ({cls}) has no config")
    where_l = f"{where}: layer {name!r} ({cls})"
    if cls_std == "InputLayer":
        if inputs:
            raise BadInput(f"{where_l}: an input layer cannot have inputs")
        shape = cfg.get("batch_shape", cfg.get("batch_input_shape"))
        if shape is None and cfg.get("shape") is not None:
            shape = [None, *cfg["shape"]]
        return {"name": name, "class": cls_std, "inputs": [],
                "config": {"shape": _input_shape(shape, name, where)}}
    if not inputs:
        raise BadInput(f"{where_l}: has no input")
    merge = cls_std in ("Add", "Concatenate")
    if merge and len(inputs) < 2:
        raise BadInput(f"{where_l}: needs at least two inputs, got {len(inputs)}")
    if not merge and len(inputs) != 1:
        raise BadInput(f"{where_l}: expects one input, got {len(inputs)}")
    return {"name": name, "class": cls_std, "inputs": inputs,
            "config": _layer_config(cls_std, cfg, where_l)}


def _input_shape(shape: Any, name: str, where: str) -> list[int]:
    if not isinstance(shape, list) or len(shape) != 4 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_DIM for s in shape[1:]):
        raise BadInput(f"{where}: input layer {name!r} has shape {str(shape)[:80]}; expected a fixed image "
                       f"shape (batch, height, width, channels), each at most {MAX_DIM}")
    return [int(s) for s in shape[1:]]


def _pair(v: Any, what: str, where: str) -> list[int]:
    if isinstance(v, int):
        v = [v, v]
    if not isinstance(v, list | tuple) or len(v) != 2 or not all(isinstance(i, int) and i > 0 for i in v):
        raise BadInput(f"{where}: {what} must be two positive integers, got {v!r}")
    return [int(v[0]), int(v[1])]


def _activation(v: Any, where: str) -> str:
    if v is None:
        return "linear"
    if isinstance(v, dict):  # serialised builtin: {"class_name": "function", "config": "relu", ...}
        v = v.get("config") if isinstance(v.get("config"), str) else v.get("class_name")
    if not isinstance(v, str) or v not in ACTIVATIONS:
        raise BadInput(f"{where}: activation {v!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return v


def _channels_last(cfg: dict, where: str) -> None:
    fmt = cfg.get("data_format")
    if fmt not in (None, "channels_last"):
        raise BadInput(f"{where}: data_format {fmt!r} is not supported (only channels_last)")


def _padding(cfg: dict, where: str) -> str:
    pad = cfg.get("padding", "valid")
    if pad not in ("valid", "same"):
        raise BadInput(f"{where}: padding {pad!r} is not supported (valid or same)")
    return pad


def _layer_config(cls: str, cfg: dict, where: str) -> dict:
    if cls == "Conv2D":
        _channels_last(cfg, where)
        if _pair(cfg.get("dilation_rate", 1), "dilation_rate", where) != [1, 1]:
            raise BadInput(f"{where}: dilation_rate {cfg.get('dilation_rate')} is not supported (only 1)")
        if cfg.get("groups", 1) != 1:
            raise BadInput(f"{where}: grouped convolution (groups={cfg.get('groups')}) is not supported")
        filters = cfg.get("filters")
        if not isinstance(filters, int) or filters <= 0:
            raise BadInput(f"{where}: filters must be a positive integer, got {filters!r}")
        return {"filters": filters, "kernel_size": _pair(cfg.get("kernel_size"), "kernel_size", where),
                "strides": _pair(cfg.get("strides", 1), "strides", where),
                "padding": _padding(cfg, where), "activation": _activation(cfg.get("activation"), where),
                "use_bias": bool(cfg.get("use_bias", True))}
    if cls in POOLS:
        _channels_last(cfg, where)
        size = _pair(cfg.get("pool_size", 2), "pool_size", where)
        strides = cfg.get("strides")
        return {"pool_size": size, "strides": size if strides is None else _pair(strides, "strides", where),
                "padding": _padding(cfg, where)}
    if cls in ("Flatten", "GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        _channels_last(cfg, where)
        if cfg.get("keepdims"):
            raise BadInput(f"{where}: keepdims=True is not supported")
        return {}
    if cls == "Dense":
        units = cfg.get("units")
        if not isinstance(units, int) or units <= 0:
            raise BadInput(f"{where}: units must be a positive integer, got {units!r}")
        return {"units": units, "activation": _activation(cfg.get("activation"), where),
                "use_bias": bool(cfg.get("use_bias", True))}
    if cls == "Add":
        return {}
    if cls == "Concatenate":
        axis = cfg.get("axis", -1)
        if not isinstance(axis, int):
            raise BadInput(f"{where}: axis must be an integer, got {axis!r}")
        return {"axis": axis}
    if cls == "Activation":
        return {"activation": _activation(cfg.get("activation"), where)}
    if cls == "ReLU":
        out = {}
        for key, default in (("max_value", None), ("negative_slope", 0.0), ("threshold", 0.0)):
            v = cfg.get(key, default)
            if v is not None and not isinstance(v, int | float):
                raise BadInput(f"{where}: {key} must be a number, got {v!r}")
            out[key] = None if v is None else float(v)
        return out
    if cls == "Dropout":
        rate = cfg.get("rate", 0.0)
        if not isinstance(rate, int | float) or not 0 <= rate < 1:
            raise BadInput(f"{where}: rate must be in [0, 1), got {rate!r}")
        return {"rate": float(rate)}
    if cls == "BatchNormalization":
        axis = cfg.get("axis", -1)
        if isinstance(axis, list) and len(axis) == 1:
            axis = axis[0]
        if not isinstance(axis, int):
            raise BadInput(f"{where}: axis must be one integer, got {axis!r}")
        eps = cfg.get("epsilon", 1e-3)
        mom = cfg.get("momentum", 0.99)
        if not isinstance(eps, int | float) or eps < 0 or not isinstance(mom, int | float):
            raise BadInput(f"{where}: malformed epsilon/momentum")
        return {"axis": axis, "epsilon": float(eps), "momentum": float(mom),
                "center": bool(cfg.get("center", True)), "scale": bool(cfg.get("scale", True))}
    raise AssertionError(cls)  # pragma: no cover  (SUPPORTED lists every class handled above)


def _toposort(nodes: list[dict], inp: str, out: str, where: str) -> list[dict]:
    """Check names and edges; order nodes so each follows its inputs (stable w.r.t. the config)."""
    by_name: dict[str, dict] = {}
    for n in nodes:
        if n["name"] in by_name:
            raise BadInput(f"{where}: two layers are called {n['name']!r}")
        by_name[n["name"]] = n
    for n in nodes:
        for src in n["inputs"]:
            if src not in by_name:
                raise BadInput(f"{where}: layer {n['name']!r} reads from unknown layer {src!r}")
    for end, what in ((inp, "input"), (out, "output")):
        if end not in by_name:
            raise BadInput(f"{where}: the {what} layer {end!r} is not among the layers")
    if by_name[inp]["class"] != "InputLayer":
        raise BadInput(f"{where}: the input layer {inp!r} is a {by_name[inp]['class']}, not an InputLayer")
    # stable: a config already in topological order (what Keras writes) keeps its order exactly,
    # which Keras' order-based ``load_weights`` relies on when it reads an exported file
    order: list[dict] = []
    done: set[str] = set()
    pending = list(nodes)
    while pending:
        ready = next((n for n in pending if all(s in done for s in n["inputs"])), None)
        if ready is None:
            raise BadInput(f"{where}: the layer graph has a cycle (at {pending[0]['name']!r})")
        order.append(ready)
        done.add(ready["name"])
        pending.remove(ready)
    needed = _ancestors(order, out)
    inputs = [n["name"] for n in order if n["class"] == "InputLayer" and n["name"] in needed]
    if inputs != [inp]:
        raise BadInput(f"{where}: the output {out!r} must depend on exactly the input {inp!r} "
                       f"(found inputs {inputs})")
    return order


def _ancestors(nodes: list[dict], name: str) -> set[str]:
    """``name`` and every node it depends on."""
    inputs = {n["name"]: n["inputs"] for n in nodes}
    seen, stack = set(), [name]
    while stack:
        cur = stack.pop()
        if cur not in seen:
            seen.add(cur)
            stack.extend(inputs[cur])
    return seen


def _drop_final_softmax(nodes: list[dict], out: str) -> str | None:
    """Replace a softmax on the final layer (possibly followed by Dropout) by a linear output."""
    by_name = {n["name"]: n for n in nodes}
    consumers: dict[str, int] = {}
    for n in nodes:
        for s in n["inputs"]:
            consumers[s] = consumers.get(s, 0) + 1
    cur = by_name[out]
    while True:
        if cur["config"].get("activation") == "softmax":
            cur["config"]["activation"] = "linear"
            return cur["name"]
        if cur["class"] != "Dropout":
            return None
        src = by_name[cur["inputs"][0]]
        if consumers.get(src["name"], 0) != 1:
            return None
        cur = src


# ---------------------------------------------------------------------------------------------
# modules (NCHW inside)
# ---------------------------------------------------------------------------------------------
def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow 'same' padding: output ceil(size/s); the odd pixel goes after (bottom/right)."""
    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _out_size(size: int, k: int, s: int, padding: str) -> int:
    return math.ceil(size / s) if padding == "same" else (size - k) // s + 1


class KerasInput(nn.Identity):
    """The model input (a named identity, so its activations can be hooked like any layer)."""


class KerasConv2D(nn.Conv2d):
    """Keras Conv2D: cross-correlation, optional bias, 'same' padding TensorFlow-style (asymmetric
    when the padding is odd), fused activation. Parameters are ``weight`` (OIHW) / ``bias``."""

    def __init__(self, cin: int, cout: int, kernel: list[int], strides: list[int],
                 pads: tuple[int, int, int, int], bias: bool, act: str):
        top, bottom, left, right = pads
        symmetric = top == bottom and left == right
        super().__init__(cin, cout, tuple(kernel), tuple(strides), (top, left) if symmetric else 0,
                         bias=bias)
        self.pads = None if symmetric else (left, right, top, bottom)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pads is not None:
            x = F.pad(x, self.pads)
        return activate(super().forward(x), self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pads={self.pads}, act={self.act}"


def _keras_pads(pads: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) → F.pad order (left, right, top, bottom), None when all zero."""
    top, bottom, left, right = pads
    return (left, right, top, bottom) if any(pads) else None


class KerasMaxPool2D(nn.MaxPool2d):
    """Keras MaxPooling2D; 'same' padding pads with -inf, so padded cells never win."""

    def __init__(self, size: list[int], strides: list[int], pads: tuple[int, int, int, int]):
        super().__init__(tuple(size), tuple(strides))
        self.pads = _keras_pads(pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pads is not None:
            x = F.pad(x, self.pads, value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pads={self.pads}"


class KerasAvgPool2D(nn.AvgPool2d):
    """Keras AveragePooling2D; with 'same' padding the mean is over the real cells only (TF)."""

    def __init__(self, size: list[int], strides: list[int], pads: tuple[int, int, int, int]):
        super().__init__(tuple(size), tuple(strides))
        self.pads = _keras_pads(pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pads is None:
            return F.avg_pool2d(x, self.kernel_size, self.stride)
        total = F.avg_pool2d(F.pad(x, self.pads), self.kernel_size, self.stride)
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        count = F.avg_pool2d(F.pad(ones, self.pads), self.kernel_size, self.stride)
        return total / count

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pads={self.pads}"


class KerasGlobalPool2D(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3)) if self.kind == "max" else x.mean(dim=(2, 3))


class KerasDense(nn.Linear):
    """Keras Dense: acts on the last Keras axis (channels for an image tensor), fused activation."""

    def __init__(self, cin: int, units: int, bias: bool, act: str):
        super().__init__(cin, units, bias=bias)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            y = super().forward(x.movedim(1, -1)).movedim(-1, 1)
        else:
            y = super().forward(x)
        return activate(y, self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act}"


class KerasAdd(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class KerasConcatenate(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class KerasActivation(nn.Module):
    def __init__(self, act: str):
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activate(x, self.act)

    def extra_repr(self) -> str:
        return f"act={self.act}"


class KerasReLU(nn.Module):
    """Keras ReLU layer: x above ``threshold`` (capped at ``max_value``), else
    ``negative_slope * (x - threshold)``."""

    def __init__(self, max_value: float | None, negative_slope: float, threshold: float):
        super().__init__()
        self.max_value, self.negative_slope, self.threshold = max_value, negative_slope, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.negative_slope == 0 and self.threshold == 0:
            y = torch.relu(x)
        else:
            y = torch.where(x >= self.threshold, x, self.negative_slope * (x - self.threshold))
        return y if self.max_value is None else torch.clamp(y, max=self.max_value)


class KerasBatchNorm2d(nn.BatchNorm2d):
    """Keras BatchNormalization on the channel axis; ``center``/``scale`` False fix beta=0/gamma=1."""

    def __init__(self, c: int, eps: float, momentum: float, center: bool, scale: bool):
        super().__init__(c, eps=eps, momentum=round(1.0 - momentum, 9))
        self.center, self.scale = center, scale
        self.weight.requires_grad_(scale)
        self.bias.requires_grad_(center)


class KerasBatchNorm1d(nn.BatchNorm1d):
    def __init__(self, c: int, eps: float, momentum: float, center: bool, scale: bool):
        super().__init__(c, eps=eps, momentum=round(1.0 - momentum, 9))
        self.center, self.scale = center, scale
        self.weight.requires_grad_(scale)
        self.bias.requires_grad_(center)


def _torch_dim(axis: int, rank: int, where: str) -> int:
    """Keras axis of a channels_last tensor of ``rank`` (incl. batch) → torch dim in NCHW."""
    a = axis + rank if axis < 0 else axis
    if not 1 <= a < rank:
        raise BadInput(f"{where}: axis {axis} is out of range for a rank-{rank} tensor")
    return {4: {1: 2, 2: 3, 3: 1}, 2: {1: 1}}[rank][a]


def _build_node(node: dict, shapes: list[tuple[int, ...]], where: str) -> tuple[nn.Module, tuple]:
    """The module for one node and its Keras output shape (without batch)."""
    cls, cfg = node["class"], node["config"]
    where = f"{where}: layer {node['name']!r} ({cls})"
    s = shapes[0] if shapes else ()
    if cls in ("Conv2D", *POOLS, "GlobalAveragePooling2D", "GlobalMaxPooling2D") and len(s) != 3:
        raise BadInput(f"{where}: needs an image tensor (H, W, C), gets shape {s}")
    if cls == "InputLayer":
        return KerasInput(), tuple(cfg["shape"])
    if cls in ("Conv2D", *POOLS):
        (kh, kw), (sh, sw) = cfg["kernel_size" if cls == "Conv2D" else "pool_size"], cfg["strides"]
        h, w, c = s
        ho, wo = _out_size(h, kh, sh, cfg["padding"]), _out_size(w, kw, sw, cfg["padding"])
        if ho <= 0 or wo <= 0:
            raise BadInput(f"{where}: window {kh}x{kw} does not fit the {h}x{w} input")
        pads = (*_same_pads(h, kh, sh), *_same_pads(w, kw, sw)) if cfg["padding"] == "same" \
            else (0, 0, 0, 0)
        if cls == "Conv2D":
            m = KerasConv2D(c, cfg["filters"], [kh, kw], [sh, sw], pads, cfg["use_bias"], cfg["activation"])
            return m, (ho, wo, cfg["filters"])
        pool = KerasMaxPool2D if cls == "MaxPooling2D" else KerasAvgPool2D
        return pool([kh, kw], [sh, sw], pads), (ho, wo, c)
    if cls in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        return KerasGlobalPool2D("max" if cls == "GlobalMaxPooling2D" else "avg"), (s[2],)
    if cls == "Flatten":
        return KerasFlatten(), (math.prod(s),)
    if cls == "Dense":
        if len(s) not in (1, 3):
            raise BadInput(f"{where}: input shape {s} is not supported")
        return KerasDense(s[-1], cfg["units"], cfg["use_bias"], cfg["activation"]), (*s[:-1], cfg["units"])
    if cls == "Add":
        if any(t != s for t in shapes):
            raise BadInput(f"{where}: inputs have different shapes {shapes}")
        return KerasAdd(), s
    if cls == "Concatenate":
        if len({len(t) for t in shapes}) != 1 or len(s) not in (1, 3):
            raise BadInput(f"{where}: cannot concatenate shapes {shapes}")
        dim = _torch_dim(cfg["axis"], len(s) + 1, where)
        a = (cfg["axis"] + len(s) + 1 if cfg["axis"] < 0 else cfg["axis"]) - 1
        if any(t[:a] + t[a + 1:] != s[:a] + s[a + 1:] for t in shapes):
            raise BadInput(f"{where}: shapes {shapes} differ outside axis {cfg['axis']}")
        return KerasConcatenate(dim), (*s[:a], sum(t[a] for t in shapes), *s[a + 1:])
    if cls == "Activation":
        return KerasActivation(cfg["activation"]), s
    if cls == "ReLU":
        return KerasReLU(cfg["max_value"], cfg["negative_slope"], cfg["threshold"]), s
    if cls == "Dropout":
        return nn.Dropout(cfg["rate"]), s
    if cls == "BatchNormalization":
        if len(s) not in (1, 3) or _torch_dim(cfg["axis"], len(s) + 1, where) != 1:
            raise BadInput(f"{where}: only normalisation over the channel (last) axis is supported")
        bn = KerasBatchNorm2d if len(s) == 3 else KerasBatchNorm1d
        return bn(s[-1], cfg["epsilon"], cfg["momentum"], cfg["center"], cfg["scale"]), s
    raise BadInput(f"{where}: not supported")


def _module_key(name: str, used: set[str]) -> str:
    """A key torch accepts in a ModuleDict (no '.', not an attribute of ModuleDict), unique."""
    key = name.replace(".", "_") or "layer"
    probe = nn.ModuleDict()
    while hasattr(probe, key) or key in used:
        key = f"{key}_"
    used.add(key)
    return key


class KerasGraph(nn.Module):
    """A Keras functional/Sequential model as a torch DAG of named layers (NCHW inside).

    ``stages`` holds one module per Keras layer, keyed by the Keras name (sanitised only where torch
    refuses it; ``keys`` maps Keras name → key), in a topological order — a graph, not a chain.
    ``forward_to(name, x)`` returns layer ``name``'s output; ``forward_from(name, h)`` runs the rest
    from it and needs ``name`` to be a *cut point* (no later layer reads a tensor computed before
    ``name`` except through it); ``stage_names`` lists the cut points in order.

    Pruning default: ``prune_layer`` is the last Conv2D that is a cut point; ``prune_point`` is the
    layer whose output is measured and masked — the conv itself, or, when the conv feeds only a
    Dropout/pooling chain, the end of that chain up to the first pooling layer (DeepID: conv_3 at
    pool_3; conv_4 sits in a branch next to fc_1 and is no cut point).
    """

    def __init__(self, options: dict, input_shape: tuple[int, int, int] | None = None):
        super().__init__()
        if not isinstance(options, dict) or options.get("format") != OPTIONS_FORMAT \
                or not isinstance(options.get("nodes"), list):
            raise BadInput("keras_graph: options are not a parsed Keras graph")
        try:
            self._build(options, input_shape)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
            raise BadInput(f"keras_graph: malformed graph options ({type(e).__name__}: {e})") from None

    def _build(self, options: dict, input_shape: tuple[int, int, int] | None) -> None:
        self.options = options
        nodes: list[dict] = options["nodes"]
        self.input_name, self.output_name = options["input"], options["output"]
        self.inputs: dict[str, list[str]] = {n["name"]: list(n["inputs"]) for n in nodes}
        self.classes: dict[str, str] = {n["name"]: n["class"] for n in nodes}
        self.keys: dict[str, str] = {}
        shapes: dict[str, tuple] = {}
        used: set[str] = set()
        stages: list[tuple[str, nn.Module]] = []
        where = f"keras graph {str(options.get('name', ''))[:80]!r}"
        _check_options(options, where)
        total = 0
        for n in nodes:
            ins = [shapes[s] for s in n["inputs"]]
            total += _params(n, ins[0] if ins else (), where)
            if total > MAX_ELEMENTS:
                raise BadInput(f"{where}: more than {MAX_ELEMENTS:,} parameters")
            module, shapes[n["name"]] = _build_node(n, ins, where)
            if math.prod(shapes[n["name"]]) > MAX_ACTIVATIONS:
                raise BadInput(f"{where}: layer {n['name']!r} outputs {shapes[n['name']]} values per image "
                               f"(at most {MAX_ACTIVATIONS:,} are accepted)")
            self.keys[n["name"]] = key = _module_key(n["name"], used)
            stages.append((key, module))
        self.stages = nn.ModuleDict(stages)
        self.shapes = shapes
        self.input_shape = tuple(shapes[self.input_name])
        if input_shape is not None and tuple(input_shape) != self.input_shape:
            raise BadInput(f"{where}: built for input {tuple(input_shape)}, the graph takes "
                           f"{self.input_shape}")
        out = shapes[self.output_name]
        if len(out) != 1:
            raise BadInput(f"{where}: the output {self.output_name!r} has shape {out}; a classifier "
                           f"needs (classes,)")
        self.num_classes = int(out[0])
        self.order = [n["name"] for n in nodes if n["name"] in _ancestors(nodes, self.output_name)]
        self._anc = {name: _ancestors(nodes, name) for name in self.order}
        self.cut_points = [n for n in self.order if self._is_cut(n)]
        self.prune_layer, self.prune_point = self._default_prune()

    # -- structure ----------------------------------------------------------------------------
    @property
    def stage_names(self) -> list[str]:
        """The layers ``forward_from`` accepts (cut points), in order."""
        return list(self.cut_points)

    @property
    def layer_order(self) -> list[str]:
        """Keras names of every layer (including those the output does not need), config order."""
        return [n["name"] for n in self.options["nodes"]]

    def module(self, name: str) -> nn.Module:
        """The module of Keras layer ``name``."""
        if name not in self.keys:
            raise BadInput(f"unknown layer {name!r} (layers: {', '.join(self.keys)})")
        return self.stages[self.keys[name]]

    def _consumers(self, name: str) -> list[str]:
        return [n for n in self.order if name in self.inputs[n]]

    def _is_cut(self, name: str) -> bool:
        before = self._anc[name] - {name}
        later = [n for n in self.order if n not in self._anc[name]]
        return all(s not in before for n in later for s in self.inputs[n])

    def _default_prune(self) -> tuple[str, str]:
        convs = [n for n in self.cut_points if self.classes[n] == "Conv2D"]
        if not convs:
            return "", ""
        layer = point = convs[-1]
        cur = layer
        while True:
            nxt = self._consumers(cur)
            if len(nxt) != 1 or not self._zero_preserving(nxt[0]):
                break
            cur = point = nxt[0]
            if self.classes[cur] in POOLS:
                break
        return layer, point

    def _zero_preserving(self, name: str) -> bool:
        cls = self.classes[name]
        if cls in _ZERO_PRESERVING:
            return True
        if cls == "Activation":
            return self.module(name).act in ("relu", "relu6", "linear")
        if cls == "ReLU":
            m = self.module(name)
            return m.threshold <= 0 or m.negative_slope == 0
        return False

    # -- running ------------------------------------------------------------------------------
    def _run(self, values: dict[str, torch.Tensor], names: list[str], want: str) -> torch.Tensor:
        last_use: dict[str, int] = {}
        for i, n in enumerate(names):
            for s in self.inputs[n]:
                last_use[s] = i
        for i, n in enumerate(names):
            m = self.stages[self.keys[n]]
            values[n] = m(*[values[s] for s in self.inputs[n]])
            for s in self.inputs[n]:
                if last_use[s] == i and s != want:
                    values.pop(s, None)
        return values[want]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_to(self.output_name, x)

    def _check(self, name: str) -> None:
        if name not in self.keys:
            raise BadInput(f"unknown layer {name!r} (layers: {', '.join(self.keys)})")
        if name not in self._anc:
            raise BadInput(f"layer {name!r} does not feed the model output")

    def forward_to(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Output of layer ``name`` for the model input ``x`` (NCHW)."""
        self._check(name)
        need = self._anc[name]
        names = [n for n in self.order if n in need and n != self.input_name]
        return self._run({self.input_name: self.stages[self.keys[self.input_name]](x)}, names, name)

    def forward_from(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """Model output given ``h``, the output of layer ``name`` (a cut point)."""
        self._check(name)
        if name not in self.cut_points:
            raise BadInput(f"cannot run the model from layer {name!r}: later layers also read tensors "
                           f"computed before it (layers that allow it: {', '.join(self.cut_points)})")
        names = [n for n in self.order if n not in self._anc[name]]
        return self._run({name: h}, names, self.output_name)


def build_keras_graph(num_classes: int, input_shape: tuple[int, int, int], options: dict) -> KerasGraph:
    """`files.SPECIAL_BUILDERS` entry: rebuild a KerasGraph from its stored options."""
    net = KerasGraph(options, input_shape)
    if num_classes != net.num_classes:
        raise BadInput(f"keras graph: sidecar says {num_classes} classes, the graph outputs "
                       f"{net.num_classes}")
    return net


files.SPECIAL_BUILDERS["keras_graph"] = build_keras_graph


# ---------------------------------------------------------------------------------------------
# loading a full-model .h5
# ---------------------------------------------------------------------------------------------
def expected_weights(net: KerasGraph, name: str) -> list[str]:
    """Keras weight names (without the layer prefix) that layer ``name`` holds, in file order."""
    m = net.module(name)
    if isinstance(m, KerasConv2D | KerasDense):
        return ["kernel", "bias"] if m.bias is not None else ["kernel"]
    if isinstance(m, KerasBatchNorm2d | KerasBatchNorm1d):
        return ([w for w, on in (("gamma", m.scale), ("beta", m.center)) if on]
                + ["moving_mean", "moving_variance"])
    return []


def check_graph_shapes(net: KerasGraph, shapes: dict, path: Path) -> None:
    """Match the weight shapes of a file (layer → [shapes in Keras order]) with the layers of ``net``
    (which may live on the meta device): the same layers hold weights, each the arrays it implies."""
    from backdoorlab.models.keras_h5 import keras_arrays

    holders = {n for n in net.keys if expected_weights(net, n)}
    given = {n for n, s in shapes.items() if s}
    if given - holders:
        raise BadInput(f"{path}: weights for layer(s) {', '.join(sorted(given - holders))} that the "
                       f"model config does not define with weights")
    if holders - given:
        raise BadInput(f"{path}: no weights for layer(s) {', '.join(sorted(holders - given))}")
    for name in sorted(holders):
        want = keras_arrays(net.module(name))
        if len(shapes[name]) != len(want):
            raise BadInput(f"{path}: layer {name!r} holds {len(shapes[name])} arrays, the config implies "
                           f"{len(want)} ({', '.join(w for w, _ in want)})")
        for got, (what, shape) in zip(shapes[name], want, strict=True):
            if tuple(got) != shape:
                raise BadInput(f"{path}: layer {name!r} {what} has shape {tuple(got)}, the model config "
                               f"implies {shape}")


def load_graph_weights(net: KerasGraph, weights: dict, path: Path) -> None:
    """Copy the arrays of a Keras weights group (layer → [arrays in Keras order]) onto ``net``."""
    from backdoorlab.models.keras_h5 import assign_keras_layer

    check_graph_shapes(net, {n: [a.shape for a in arrays] for n, arrays in weights.items()}, path)
    for name in (n for n in net.keys if expected_weights(net, n)):
        arrays, names = list(weights[name]), expected_weights(net, name)
        m = net.module(name)
        if isinstance(m, KerasBatchNorm2d | KerasBatchNorm1d):
            by = dict(zip(names, arrays, strict=True))
            ones = torch.ones(m.num_features).numpy()
            arrays = [by.get("gamma", ones), by.get("beta", 0 * ones), by["moving_mean"],
                      by["moving_variance"]]
        assign_keras_layer(m, name, arrays, path)


def load_keras_model(path: str | os.PathLike, input_scale: str | None = None) -> Classifier:
    """Import a full-model Keras HDF5 file (``model_config`` + ``model_weights``) as a Classifier.

    ``input_scale``: ``raw`` or ``unit`` (default ``unit``: Keras files carry no scale)."""
    from backdoorlab.models.architectures import check_size
    from backdoorlab.models.keras_h5 import _attr_str, _open, read_keras_weights

    path = Path(path)
    f = _open(path)
    with f:
        try:
            raw = f.attrs.get("model_config")
            version = _attr_str(f.attrs.get("keras_version", "unknown"))[:80]
        except Exception as e:
            raise BadInput(f"{path}: unreadable attributes ({type(e).__name__}: {e})") from None
    if raw is None:
        raise BadInput(f"{path}: no 'model_config' attribute (not a full-model Keras file)")
    if not isinstance(raw, bytes | str):
        raise BadInput(f"{path}: 'model_config' is a {type(raw).__name__}, expected JSON text")
    options = parse_keras_config(raw, str(path))
    try:
        with torch.device("meta"):  # sizes first: nothing is allocated until the file's weights fit
            probe = KerasGraph(options)
    except BadInput as e:
        raise BadInput(f"{path}: {e}") from None
    check_size(probe, f"{path}: keras graph")
    weights = read_keras_weights(path, lambda shapes: check_graph_shapes(probe, shapes, path))
    net = KerasGraph(options)
    load_graph_weights(net, weights, path)
    spec = InputSpec(*net.input_shape, scale=input_scale or "unit")
    prov = {"source": str(path), "source_format": "keras-h5-model", "keras_version": version}
    if options["dropped_softmax"]:
        prov["dropped_softmax"] = options["dropped_softmax"]
    return Classifier(net, spec, net.num_classes, "keras_graph", options, prov)
