"""Experiment files (TOML): one data set and architecture, a training budget, attacks × defenses × seeds.

```toml
name = "BadNets vs FTrojan on GTSRB"
seeds = [0, 1]

[data]
source = "gtsrb:${BACKDOORLAB_DATA:-../shared/data}/gtsrb32/GTSRB"
train_limit = 8000          # optional: seeded sample of the training images

[model]
arch = "gtsrb_cnn"

[train]                     # options of `backdoorlab attack`
epochs = 3

[[attack]]
name = "badnets"
trigger = "patch:size=4"
target = 0
rate = 0.05

[[defense]]
name = "fine-pruning"
kind = "fine-prune"         # a repair of `backdoorlab list` (prune, guided-prune, nc-unlearn …),
                            # a model detector or an input detector (`GRID_FAMILIES`)
epochs = 5                  # other keys are the method's options; a list of values is a grid axis
```

An input detector's table also takes the options `backdoorlab detect` gives every input detector
(``far``, ``calibration``: `family_options`), checked with the command's own types.

Paths may use ``${VAR}`` and ``${VAR:-default}``; relative paths are taken from the working
directory, as on the command line. Every key is checked: a typo is an error, not a silent default.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from backdoorlab.errors import BadInput
from backdoorlab.poisoned import as_list

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATA_KEYS = {"source", "test", "size", "train_limit", "test_limit", "valid_fraction", "test_fraction"}
MODEL_KEYS = {"arch", "input_scale"}
TRAIN_KEYS = {"epochs", "batch_size", "lr", "optimizer", "schedule", "augment", "crop_padding"}
ATTACK_KEYS = {"name", "trigger", "target", "rate", "mode", "clean_label", "pruning_aware",
               "pa_max_drop", "pa_dormant_shift"}
# an [[attack]] with "model" is a given (already backdoored) model and its data files, e.g. a CSAW BadNet
# (``train``: the training set it was trained on, for data inspectors)
GIVEN_KEYS = {"name", "model", "arch", "input_scale", "valid", "test", "poisoned", "poisoned_valid", "target",
              "poisoned_labels", "train"}
# keys of a [[defense]] table that the experiment itself reads; the others are the method's options
# (`backdoorlab list -v`), or with the prefix nc_ options of the Neural Cleanse scan that gives a
# method its reversed triggers
DEFENSE_OWN_KEYS = {"name", "kind", "guide", "mitigate"}
# the method families a [[defense]] may name (`backdoorlab.registry.FAMILIES`)
GRID_FAMILIES = ("repair", "model-detector", "input-detector", "data-inspector")
# kinds and keys of earlier experiment files, still read
KIND_ALIASES = {"guided": "guided-prune"}
CLEANSE_MITIGATIONS = {"unlearn": "nc-unlearn", "prune": "nc-prune", "filter": "nc-filter"}
RENAMED_KEYS = {"report_drop": "drop", "mitigate_epochs": "epochs"}
TOP_KEYS = {"name", "description", "seeds", "data", "model", "train", "attack", "defense", "compute"}
# [compute]: where every cell computes (`backdoorlab.device`); absent = cpu and fp32
COMPUTE_KEYS = {"device", "precision"}
# options the runner sets itself (files and output folder): not allowed in a [[defense]] table
RESERVED = {"model", "valid", "test", "poisoned", "out", "clean", "guide_triggers", "seed", "drops",
            "mitigate_labels", "target", "triggers", "trigger_labels"}
# switches among the [data]/[model]/[train]/[[attack]] keys (true/false); every other key takes a
# value, never true/false (a `false` would silently drop the option and train with its default)
BOOL_KEYS = {"clean_label", "pruning_aware"}
LIST_KEYS = {"trigger", "target"}  # [[attack]] keys that take a list (one entry per trigger)
SCALES = ("raw", "unit")

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(text: str, where: str) -> str:
    """Replace ``${VAR}`` / ``${VAR:-default}``; an unset variable without default is an error."""

    def sub(m: re.Match) -> str:
        val = os.environ.get(m.group(1))
        if val:
            return val
        if m.group(2) is not None:
            return m.group(2)
        raise BadInput(f"{where}: environment variable {m.group(1)} is not set (write "
                       f"${{{m.group(1)}:-default}} to give a default)")

    return _VAR.sub(sub, text)


@dataclass
class AttackSpec:
    name: str
    options: dict  # `backdoorlab attack` options (trigger/target lists, rate, mode, ...)
    given: dict | None = None  # a model handed over with its data files, not trained here


@dataclass
class DefenseSpec:
    """One defense of the grid: a registered method (`backdoorlab.registry`) and its options.

    ``guide`` (methods that need backdoored inputs): ``"poisoned"`` = the attack's poisoned
    validation images (the defender holds some), ``"cleanse"`` = Neural Cleanse's reversed
    triggers; ``scan``: options of that Neural Cleanse scan (methods needing triggers);
    ``family_options``: options the family's command gives every method of it (input detectors:
    ``far`` and ``calibration`` of `backdoorlab detect`, `family_options`)."""

    name: str
    method: str
    options: dict   # only the options the file sets (checked against the method's dataclass)
    guide: str = "poisoned"
    scan: dict = field(default_factory=dict)
    family_options: dict = field(default_factory=dict)  # only those the file sets


@dataclass
class Experiment:
    name: str
    description: str
    seeds: list[int]
    data: dict
    model: dict
    train: dict
    attacks: list[AttackSpec]
    defenses: list[DefenseSpec]
    path: str = ""
    extra: dict = field(default_factory=dict)
    compute: dict = field(default_factory=dict)  # {"device": ..., "precision": ...} when not cpu/fp32


def _compute(doc: dict, path: str) -> dict:
    """The [compute] table, checked (a device that is not on this machine is refused here, before
    any cell); the defaults (cpu, fp32) are dropped so the cells' cache keys stay those of a file
    without the table."""
    from backdoorlab.device import check_precision, resolve_device

    table = doc.get("compute", {})
    _check_keys(table, COMPUTE_KEYS, f"{path} [compute]")
    for k, v in table.items():
        if not isinstance(v, str):
            raise BadInput(f"{path} [compute] {k}: expected a string, got {v!r}")
    try:
        device = resolve_device(table.get("device", "cpu"))
        check_precision(table.get("precision", "fp32"), device)
    except BadInput as e:
        raise BadInput(f"{path} [compute]: {e}") from None
    out = {}
    if table.get("device", "cpu").strip().lower() != "cpu":
        out["device"] = table["device"].strip().lower()
    if table.get("precision", "fp32").strip().lower() != "fp32":
        out["precision"] = table["precision"].strip().lower()
    return out


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise BadInput(f"{where}: expected a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise BadInput(f"{where}: unknown key(s) {', '.join(unknown)} "
                       f"(allowed: {', '.join(sorted(allowed))})")


def _as_list(v) -> list:
    return list(v) if isinstance(v, list) else [v]


def _scalar_options(table: dict, where: str) -> dict:
    for k, v in table.items():
        if isinstance(v, dict):
            raise BadInput(f"{where}: option {k} is a table; options are numbers, strings, booleans or lists")
    return dict(table)


def _check_values(table: dict, where: str) -> None:
    """Value types of the keys that become `backdoorlab attack` flags (see BOOL_KEYS, LIST_KEYS)."""
    for k, v in table.items():
        items = v if isinstance(v, list) and k in LIST_KEYS else [v]
        if isinstance(v, list) and k not in LIST_KEYS:
            raise BadInput(f"{where}: {k} takes one value, got the list {v!r} (grid axes are lists of "
                           "defense options)")
        for item in items:
            if k in BOOL_KEYS and not isinstance(item, bool):
                raise BadInput(f"{where}: {k} must be true or false, got {item!r}")
            if k not in BOOL_KEYS and isinstance(item, bool):
                raise BadInput(f"{where}: {k} takes a value, not {str(item).lower()}")
            if k == "target" and not isinstance(item, int):
                raise BadInput(f"{where}: target must be a label (an integer) or a list of them, got "
                               f"{item!r}")
            if k in ("trigger", "arch", "input_scale", "optimizer", "schedule", "augment", "mode") \
                    and not isinstance(item, str):
                raise BadInput(f"{where}: {k} must be a string, got {item!r}")


def _name_ok(name, where: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise BadInput(f"{where}: name {name!r} must be letters, digits, '-', '_' or '.'")
    return name


def parse_experiment(doc: dict, path: str = "<config>") -> Experiment:
    """Validate a parsed TOML document; raise BadInput naming the first problem."""
    _check_keys(doc, TOP_KEYS, path)
    if "attack" not in doc:
        raise BadInput(f"{path}: no [[attack]]")
    trains = any(isinstance(a, dict) and "model" not in a for a in _as_list(doc["attack"]))
    for key in ("data", "model"):
        if trains and key not in doc:
            raise BadInput(f"{path}: missing [{key}] (needed to train the attack models)")
    data = dict(doc.get("data", {}))
    _check_keys(data, DATA_KEYS, f"{path} [data]")
    _check_values(data, f"{path} [data]")
    if trains and "source" not in data:
        raise BadInput(f"{path} [data]: missing 'source' (e.g. \"gtsrb:path/to/GTSRB\" or \"digits\")")
    for k in ("source", "test"):
        if k in data:
            data[k] = expand(str(data[k]), f"{path} [data] {k}")
    model = dict(doc.get("model", {}))
    _check_keys(model, MODEL_KEYS, f"{path} [model]")
    _check_values(model, f"{path} [model]")
    if trains and "arch" not in model:
        raise BadInput(f"{path} [model]: missing 'arch' (gtsrb_cnn, preact_resnet18, small_cnn, deepid)")
    train = dict(doc.get("train", {}))
    _check_keys(train, TRAIN_KEYS, f"{path} [train]")
    _check_values(train, f"{path} [train]")
    seeds = doc.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise BadInput(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise BadInput(f"{path}: seeds repeat: {seeds}")
    attacks = []
    for i, a in enumerate(_as_list(doc["attack"])):
        where = f"{path} [[attack]] #{i + 1}"
        if isinstance(a, dict) and "model" in a:
            _check_keys(a, GIVEN_KEYS, where)
            given = {k: v for k, v in a.items() if k != "name"}
            for t in as_list(given.get("target")):
                if isinstance(t, bool) or not isinstance(t, int):
                    raise BadInput(f"{where}: target must be a label (an integer) or a list of them, "
                                   f"got {t!r}")
            if "arch" in given and not isinstance(given["arch"], str):
                raise BadInput(f"{where}: arch must name an architecture, got {given['arch']!r}")
            if given.get("input_scale", "unit") not in SCALES:
                raise BadInput(f"{where}: input_scale must be raw or unit, got {given['input_scale']!r}")
            for k in ("valid", "test"):
                if k not in given:
                    raise BadInput(f"{where}: a given model needs '{k}' (clean labeled data)")
            for k in ("model", "valid", "test", "poisoned", "poisoned_valid", "train"):
                if isinstance(given.get(k), list):  # several poisoned sets, one per trigger
                    given[k] = [expand(str(v), f"{where} {k}") for v in given[k]]
                elif k in given:
                    given[k] = expand(str(given[k]), f"{where} {k}")
            n_sets = len(as_list(given.get("poisoned")))
            n_targets = len(as_list(given.get("target")))
            if n_targets and n_targets != n_sets:
                raise BadInput(f"{where}: {n_sets} poisoned set(s) need as many targets (one each, same "
                               f"order), got {n_targets}")
            if given.get("poisoned_labels", "auto") not in ("auto", "true", "target"):
                raise BadInput(f"{where}: poisoned_labels must be auto, true or target, got "
                               f"{given['poisoned_labels']!r}")
            attacks.append(AttackSpec(_name_ok(a.get("name", f"model{i + 1}"), where), {}, given))
            continue
        _check_keys(a, ATTACK_KEYS, where)
        name = _name_ok(a.get("name", f"attack{i + 1}"), where)
        opts = _scalar_options({k: v for k, v in a.items() if k != "name"}, where)
        _check_values(opts, where)
        if "trigger" in opts:
            opts["trigger"] = _as_list(opts["trigger"])
        if "target" in opts:
            opts["target"] = _as_list(opts["target"])
        attacks.append(AttackSpec(name, opts))
    defenses = []
    for i, d in enumerate(_as_list(doc.get("defense", []))):
        defenses += parse_defense(d, f"{path} [[defense]] #{i + 1}")
    from backdoorlab import registry

    inspectors = [d.name for d in defenses if registry.get(d.method).family == "data-inspector"]
    for a in attacks:
        if inspectors and a.given is not None and "train" not in a.given:
            raise BadInput(f"{path} [[attack]] {a.name}: the data inspector(s) {', '.join(inspectors)} "
                           "need the training set of a given model: add train = \"PATH\" (its labels "
                           "as trained on)")
    for what, items in (("attack", attacks), ("defense", defenses)):
        names = [x.name for x in items]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise BadInput(f"{path}: {what} name(s) used twice: {', '.join(dup)}")
    return Experiment(name=str(doc.get("name", Path(path).stem)), description=str(doc.get("description", "")),
                      seeds=seeds, data=data, model=model, train=train, attacks=attacks,
                      defenses=defenses, path=path, compute=_compute(doc, path))


def _legacy_cleanse(d: dict, where: str) -> dict:
    """Earlier files' ``kind = "cleanse"`` (Neural Cleanse + ``mitigate`` = unlearn|prune|filter) as
    today's table: ``kind`` = the nc-* repair, the scan's options prefixed ``nc_``."""
    from backdoorlab import registry
    from backdoorlab.options import infos

    mitigate = d.get("mitigate", "unlearn")
    if mitigate not in CLEANSE_MITIGATIONS:
        raise BadInput(f"{where}: mitigate must be unlearn, prune or filter, got {mitigate!r}")
    own = {i.name for i in infos(registry.get(CLEANSE_MITIGATIONS[mitigate], "repair").options)}
    out = {"kind": CLEANSE_MITIGATIONS[mitigate], "name": d.get("name", "cleanse")}
    for k, v in d.items():
        if k in ("kind", "name", "mitigate"):
            continue
        mine = (k in DEFENSE_OWN_KEYS or k.startswith("nc_") or k in own or k in RESERVED
                or RENAMED_KEYS.get(k) in own)
        out[k if mine else f"nc_{k}"] = v
    return out


def family_options(family: str) -> dict[str, dict]:
    """The options the command of a method family gives every method of it, besides the method's
    own: {key: the argparse keywords of its flag ``--key``} (input detectors: `backdoorlab detect`'s
    ``--far`` and ``--calibration``). A [[defense]] table takes them as keys."""
    if family == "input-detector":
        from backdoorlab.commands.detect import INPUT_DETECT_OPTIONS

        return INPUT_DETECT_OPTIONS
    return {}


def _check_family_option(spec: dict, key: str, v, where: str):
    """``v`` checked by the command's own argparse type of ``--key`` (its bounds, its message)."""
    import argparse

    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BadInput(f"{where}: {key} must be a number, got {v!r}")
    try:
        spec["type"](str(v))
    except argparse.ArgumentTypeError as e:
        raise BadInput(f"{where}: {key}: {e}") from None
    return v


def parse_defense(d, where: str) -> list[DefenseSpec]:
    """A [[defense]] table → its DefenseSpecs: an option given as a list of values is an axis of
    the grid (one defense per value, named ``NAME-OPTIONVALUE``, e.g. ``pruning-drop2``)."""
    import itertools

    from backdoorlab import registry
    from backdoorlab.options import from_mapping, infos

    if not isinstance(d, dict):
        raise BadInput(f"{where}: expected a table")
    kind = d.get("kind")
    if not isinstance(kind, str):
        raise BadInput(f"{where}: kind must name a method (see 'backdoorlab list'), got {kind!r}")
    if kind == "cleanse":
        d = _legacy_cleanse(d, where)
    if "mitigate" in d:
        raise BadInput(f"{where}: mitigate goes with kind = \"cleanse\"")
    try:
        method = registry.get(KIND_ALIASES.get(d["kind"], d["kind"]))
    except BadInput as e:
        raise BadInput(f"{where}: kind: {e}") from None
    if method.family not in GRID_FAMILIES:
        raise BadInput(f"{where}: kind {kind!r} is a {method.family}, not a defense of the grid")
    name = _name_ok(d.get("name", kind), where)
    where = f"{where} ({name})"
    own = {i.name for i in infos(method.options)}
    fam_specs = family_options(method.family)
    opts: dict = {}
    scan: dict = {}
    fam: dict = {}
    for k, v in d.items():
        if k in DEFENSE_OWN_KEYS:
            continue
        if isinstance(v, dict):
            raise BadInput(f"{where}: option {k} is a table; options are numbers, strings, booleans or lists")
        key = RENAMED_KEYS.get(k, k) if RENAMED_KEYS.get(k) in own else k
        if key in RESERVED:
            raise BadInput(f"{where}: {key} is set by the experiment runner, not in the file")
        if key.startswith("nc_"):
            scan[key[3:]] = v
        elif key in own:
            opts[key] = v
        elif key in fam_specs:
            fam[key] = v
        else:
            known = sorted(own) + sorted(set(fam_specs) - own)
            raise BadInput(f"{where}: unknown option {k} for {method.name} (options: "
                           f"{', '.join(known) or 'none'}; 'backdoorlab list -v' shows them)")
    if method.family != "repair" and "guide" in d:
        raise BadInput(f"{where}: guide is for repairs, not the detector {method.name}")
    needs_scan = "triggers" in method.needs or ("backdoored" in method.needs and d.get("guide") == "cleanse")
    if scan and not needs_scan:
        raise BadInput(f"{where}: {method.name} runs no Neural Cleanse scan; nc_ options are not used")
    guide = d.get("guide", "poisoned")
    if "guide" in d and "backdoored" not in method.needs:
        raise BadInput(f"{where}: guide is for methods that use backdoored inputs, not {method.name}")
    if guide not in ("poisoned", "cleanse"):
        raise BadInput(f"{where}: guide must be \"poisoned\" or \"cleanse\", got {guide!r}")
    axes = {k: v for k, v in {**opts, **fam}.items() if isinstance(v, list)}
    for k, v in axes.items():
        if not v or len(set(map(str, v))) != len(v):
            raise BadInput(f"{where}: {k} lists no values or repeats one: {v!r}")
    out = []
    for combo in itertools.product(*axes.values()) if axes else [()]:
        chosen = dict(zip(axes, combo, strict=True))
        values = {k: chosen.get(k, v) for k, v in opts.items()}
        from_mapping(method.options, values, where)  # types, bounds, choices
        fvalues = {k: _check_family_option(fam_specs[k], k, chosen.get(k, v), where) for k, v in fam.items()}
        label = name + "".join(f"-{k.replace('_', '-')}{_short(v)}" for k, v in chosen.items())
        out.append(DefenseSpec(_name_ok(label, where), method.name, values, guide, scan, fvalues))
    return out


def _short(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def load_experiment(path: str | Path) -> Experiment:
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{p}: no such experiment file")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{p}: not valid TOML ({e})") from None
    return parse_experiment(doc, str(p))
