"""The device rule of `backdoorlab.device`, checked on the source (``ast``), so a GPU-only mistake
fails on a CPU-only machine too:

- no ``.cuda(...)`` call anywhere in ``src/backdoorlab`` but ``device.py`` (algorithms create
  their tensors on ``clf.device``), and no ``.to("cuda...")`` with a literal device name;
- every ``torch.Generator(...)`` either passes ``device=`` or is documented CPU-only: a comment
  saying ``CPU-only`` on the call's line or the line above (a host generator is the rule for
  permutations, crops and random starts: the same draws on every device);
- every ``.numpy()`` reads a host tensor: the expression it is called on goes through ``.cpu()``
  (``t.float().cpu().numpy()``), or is a torch factory call without ``device=``
  (``torch.ones(n).numpy()``), or its line says ``CPU-only`` in a comment (a tensor made on the
  host, e.g. from ``torch.from_numpy``). ``.numpy()`` on a CUDA tensor raises; ``.cpu()`` on a
  host tensor returns it as it is, so the rule costs the CPU nothing.

Each check is also run on a snippet that breaks it, so a check that cannot fail is caught.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "backdoorlab"
ALLOWED_CUDA = {"device.py"}  # the one module that owns the device
MARK = "cpu-only"
FACTORIES = {"zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm", "arange",
             "linspace", "eye", "tensor", "zeros_like", "ones_like", "empty_like", "full_like",
             "rand_like", "randn_like"}


def _comments(text: str) -> dict[int, str]:
    """Line number → the comment on that line (lower case)."""
    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lower()
    return out


def _marked(comments: dict[int, str], node: ast.AST, above: bool = False) -> bool:
    lines = range(node.lineno - (1 if above else 0), getattr(node, "end_lineno", node.lineno) + 1)
    return any(MARK in comments.get(i, "") for i in lines)


def _is_torch_call(node: ast.AST, names: set[str]) -> bool:
    """``torch.<name>(...)`` for a name in ``names``."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in names and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch")


def _has_device(call: ast.Call) -> bool:
    return any(k.arg == "device" for k in call.keywords)


def _chain(node: ast.AST):
    """The receivers of a method chain, outermost first: ``a.b().c[0].d()`` → d(), c[0], c, b(), …"""
    while True:
        yield node
        if isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Attribute | ast.Subscript):
            node = node.value
        else:
            return


def _goes_through_cpu(receiver: ast.AST) -> bool:
    for n in _chain(receiver):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "cpu":
            return True
        if isinstance(n, ast.Call) and _is_torch_call(n, FACTORIES) and not _has_device(n):
            return True  # made on the host
    return False


def _literal_cuda(call: ast.Call) -> bool:
    args = [*call.args, *(k.value for k in call.keywords)]
    return any(isinstance(a, ast.Constant) and isinstance(a.value, str)
               and a.value.lower().startswith("cuda") for a in args)


def violations(text: str, name: str) -> list[str]:
    """Every break of the rules above in the module source ``text`` (``name``: its file name)."""
    tree = ast.parse(text)
    comments = _comments(text)
    owner = name in ALLOWED_CUDA
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{name}:{node.lineno}"
        method = node.func.attr if isinstance(node.func, ast.Attribute) else None
        if method == "cuda" and not owner:
            out.append(f"{where}: .cuda() call (create tensors on clf.device instead)")
        if method == "to" and not owner and _literal_cuda(node):
            out.append(f"{where}: .to('cuda...') with a literal device (use clf.device)")
        if (_is_torch_call(node, {"Generator"}) and not _has_device(node)
                and not _marked(comments, node, above=True)):
            out.append(f"{where}: torch.Generator() without device= and without a CPU-only comment")
        if (method == "numpy" and not node.args and not _goes_through_cpu(node.func.value)
                and not _marked(comments, node)):
            out.append(f"{where}: .numpy() on a tensor that may be on a GPU (add .cpu() first)")
    return out


def _sources() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50 and (SRC / "device.py") in files
    return files


def test_the_source_follows_the_device_rule():
    found = [v for p in _sources() for v in violations(p.read_text(encoding="utf-8"),
                                                           str(p.relative_to(SRC)))]
    assert not found, "device rule broken:\n" + "\n".join(found)


BAD = {
    "cuda": "x = torch.zeros(3).cuda()\n",
    "cuda-method-on-net": "net.cuda()\n",
    "to-cuda": "x = x.to('cuda:0')\n",
    "generator": "g = torch.Generator().manual_seed(0)\n",
    "generator-unrelated-comment": "# seeded\ng = torch.Generator()\n",
    "numpy-of-net-output": "y = net(x).argmax(1).numpy()\n",
    "numpy-after-float": "a = captured[-1].float().reshape(3, -1).numpy()\n",
    "numpy-of-device-factory": "a = torch.ones(3, device=dev).numpy()\n",
}
GOOD = {
    "cuda-available": "ok = torch.cuda.is_available()\n",
    "to-device": "x = x.to(clf.device)\n",
    "generator-device": "g = torch.Generator(device=dev)\n",
    "generator-marked": "g = torch.Generator()  # CPU-only: host permutations\n",
    "generator-marked-above": "# CPU-only: host draws\ng = torch.Generator().manual_seed(1)\n",
    "numpy-after-cpu": "a = h.mean(1).cpu().double().numpy()\n",
    "numpy-of-host-factory": "a = torch.ones(3).numpy()\n",
    "numpy-marked": "a = torch.from_numpy(p).numpy()  # CPU-only\n",
}


@pytest.mark.parametrize("key", sorted(BAD))
def test_each_check_can_fail(key):
    assert len(violations(BAD[key], "algorithm.py")) == 1, key


@pytest.mark.parametrize("key", sorted(GOOD))
def test_what_the_rule_allows(key):
    assert violations(GOOD[key], "algorithm.py") == [], key


def test_device_py_may_name_cuda():
    assert violations("torch.zeros(1).cuda()\n", "device.py") == []
