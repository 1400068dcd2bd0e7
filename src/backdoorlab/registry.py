"""The one registry of methods: name → family, options, paper, data needed, function.

A method registers itself in its own module with `register` (a decorator on its function); every
module of a family's package (``backdoorlab.repairs`` …) is imported on first use, so a new method
is one new file. The CLI (``backdoorlab repair NAME``, ``backdoorlab list``), the experiment files
of ``backdoorlab run`` and their validation all read this registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from backdoorlab.errors import BadInput
from backdoorlab.options import describe

FAMILIES = {
    "repair": "model + the defender's clean data (+ backdoored inputs or reversed triggers where the "
              "method assumes them) → repaired model",
    "model-detector": "model + the defender's clean data → backdoored or not, suspected target "
                      "label(s), the method's statistic",
    "input-detector": "model + the defender's clean data → a suspicion score per input; the threshold "
                      "is set on clean data at a requested false-alarm rate (usable as a class-N filter)",
    "data-inspector": "a labelled training set that may be poisoned + a model trained on it → a "
                      "suspicion score per sample and the flagged samples",
}
PACKAGES = {"repair": "backdoorlab.repairs", "model-detector": "backdoorlab.detectors",
            "input-detector": "backdoorlab.input_detectors", "data-inspector": "backdoorlab.inspectors"}
# what a method may need besides the model
NEEDS = {
    "clean": "clean labelled data the defender holds",
    "poisoned": "backdoored inputs the defender holds",
    "backdoored": "backdoored inputs the defender holds, or reversed triggers stamped on clean images",
    "triggers": "reversed triggers (triggers.npz of `backdoorlab cleanse`) and the labels to use",
    "training-set": "the labelled training set the model was trained on (possibly poisoned)",
}


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    options: type            # a dataclass of `backdoorlab.options.opt` fields
    run: Callable
    paper: str               # citation: authors, venue, year
    needs: tuple[str, ...]   # keys of NEEDS
    summary: str             # one line for `list` and --help
    paper_setting: str = ""  # the schedule and data of the paper's own experiments, for comparison
    in_scan: bool = True     # model detectors: run by `scan` unless --detector names others
    revision: int = 0        # bumped when what the method computes changes without an option

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "summary": self.summary, "paper": self.paper,
                "paper_setting": self.paper_setting, "needs": list(self.needs),
                **({"in_scan": self.in_scan} if self.family == "model-detector" else {}),
                "options": describe(self.options)}


_METHODS: dict[str, Method] = {}
_loaded: set[str] = set()


def register(name: str, family: str, options: type, paper: str, summary: str,
             needs: tuple[str, ...] = ("clean",), paper_setting: str = "",
             in_scan: bool = True, revision: int = 0) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as method ``name`` of ``family``. ``paper_setting``: the
    schedule and defender data of the paper's experiments (shown next to our defaults).
    ``in_scan`` (model detectors): part of `scan`'s default set. ``revision``: raise it when a change
    of the code alters what the method computes at the same options; `run` grids then compute its
    cells again (cells of revision 0 keep the keys they had before revisions existed)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    bad = set(needs) - set(NEEDS)
    if bad:
        raise ValueError(f"{name}: unknown needs {sorted(bad)}")

    def deco(fn: Callable) -> Callable:
        if name in _METHODS and _METHODS[name].run is not fn:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = Method(name, family, options, fn, paper, tuple(needs), summary, paper_setting,
                                in_scan, revision)
        return fn

    return deco


PLUGINS_ENV = "BACKDOORLAB_METHODS"  # folders (os.pathsep-separated) of extra method files


def _load(family: str) -> None:
    if family in _loaded:
        return
    _loaded.add(family)
    pkg = importlib.import_module(PACKAGES[family])
    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not m.name.startswith("_"):
            importlib.import_module(f"{PACKAGES[family]}.{m.name}")
    _load_plugins()


def _load_plugins() -> None:
    """Method files outside the source tree: every ``*.py`` in the folders named by
    ``$BACKDOORLAB_METHODS`` (your own code, imported like any module; worker processes of
    ``backdoorlab run`` inherit the variable)."""
    import importlib.util
    import os
    import sys
    from pathlib import Path

    for folder in filter(None, os.environ.get(PLUGINS_ENV, "").split(os.pathsep)):
        d = Path(folder)
        if not d.is_dir():
            raise BadInput(f"${PLUGINS_ENV}: {d} is not a folder")
        for f in sorted(d.glob("*.py")):
            name = f"backdoorlab_methods.{f.stem}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, f)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


def methods(family: str | None = None) -> list[Method]:
    """Registered methods (of one family), sorted by family then name."""
    for f in [family] if family else list(FAMILIES):
        _load(f)
    return sorted((m for m in _METHODS.values() if family in (None, m.family)),
                  key=lambda m: (list(FAMILIES).index(m.family), m.name))


def get(name: str, family: str | None = None) -> Method:
    """The method ``name`` (of ``family``), or `BadInput` listing the known names."""
    known = {m.name: m for m in methods(family)}
    if name not in known:
        what = f"{family} method" if family else "method"
        raise BadInput(f"unknown {what} {name!r} (known: {', '.join(known)})")
    return known[name]
