"""Checks of everything an experiment will use, before any cell runs or the output folder is touched.

`check_options` (cells.py) parses every cell's command line; `preflight` checks what a command
would only find once it has loaded its data: the data sources (format, image shape and class count,
read from their metadata only: `backdoorlab.data.peek`), the architecture (built on torch's meta
device for that shape: nothing is allocated), every trigger spec against the image shape (its
picture files read), the targets against the class count, a handed-over model (loaded: its file,
architecture and input scale) against its data files, the layers and labels the defenses name,
and the data a defense needs (a guided repair needs the attack's poisoned validation images). A
bad value is one `BadInput` naming the attack or defense; a good file costs well under a second.
`experiment_inputs` lists the files the grid reads, which ``--overwrite`` never deletes.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from backdoorlab.errors import BadInput
from backdoorlab.experiment.config import AttackSpec, Experiment
from backdoorlab.poisoned import as_list

SPLIT_FORMATS = ("gtsrb", "cifar10", "mnist")  # formats with their own test split (as `attack`)


@dataclass
class _Model:
    """What the defenses of one attack start from: a classifier (on the meta device for a model
    still to train; None when the image shape is only known once the data is read), its class
    count and whether the attack gives poisoned validation images (``guide = "poisoned"``)."""

    clf: Any
    num_classes: int | None
    has_guide: bool
    why_no_guide: str = ""


def preflight(exp: Experiment, executor: str = "local") -> None:
    """Refuse (`BadInput`, one line) whatever a cell of ``exp`` would refuse from its inputs."""
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise BadInput("--executor ray needs Ray: pip install 'backdoorlab[ray]' (or use --executor local)")
    models: dict[str, _Model] = {}
    trained = [a for a in exp.attacks if a.given is None]
    if trained:
        models.update(_trained_models(exp, trained))
    for a in exp.attacks:
        if a.given is not None:
            models[a.name] = _given_model(exp, a)
    for d in exp.defenses:
        for a in exp.attacks:
            _check_defense(exp, d, a, models[a.name])


def experiment_inputs(exp: Experiment) -> list[str]:
    """Every file or folder the grid reads (``FORMAT:PATH`` sources as given): the experiment file,
    the data, handed-over models (and their sidecars) with their data files, trigger pictures."""
    from backdoorlab.commands.common import trigger_files

    out = [exp.path]
    out += [str(exp.data[k]) for k in ("source", "test") if exp.data.get(k) and exp.data[k] != "digits"]
    for a in exp.attacks:
        if a.given is None:
            out += trigger_files([str(t) for t in as_list(a.options.get("trigger"))])
            continue
        for k in ("model", "valid", "test", "poisoned", "poisoned_valid", "train"):
            out += [str(v) for v in as_list(a.given.get(k))]
        model = str(a.given["model"])
        if model.endswith(".safetensors"):
            out.append(model[: -len(".safetensors")] + ".json")
    return out


# -- attacks trained here -------------------------------------------------------------------------

def _trained_models(exp: Experiment, trained: list[AttackSpec]) -> dict[str, _Model]:
    import torch

    from backdoorlab.data.peek import peek_dataset
    from backdoorlab.models import architectures
    from backdoorlab.models.classifier import Classifier
    from backdoorlab.models.spec import InputSpec

    where = f"{exp.path} [data]"
    size = exp.data.get("size")
    size = size if isinstance(size, int) and not isinstance(size, bool) else None  # else argparse says
    train = _peek(peek_dataset, exp.data["source"], "train", size, f"{where} source")
    if exp.data.get("test"):
        test = _peek(peek_dataset, exp.data["test"], "test", size, f"{where} test")
    elif train.format in SPLIT_FORMATS:
        test = _peek(peek_dataset, exp.data["source"], "test", size, f"{where} source (test split)")
    else:
        test = train  # a share carved from the same data
    if train.labeled is False:
        raise BadInput(f"{where} source {train.source}: the training data has no labels")
    if test.labeled is False:
        raise BadInput(f"{where} test {test.source}: the test data has no labels")
    if train.shape and test.shape and train.shape != test.shape:
        raise BadInput(f"{where}: training images are {train.shape} but test images {test.shape}")
    if train.num_classes and test.num_classes and train.num_classes != test.num_classes:
        raise BadInput(f"{where}: training data has {train.num_classes} classes, test data "
                       f"{test.num_classes}")
    k, shape = train.num_classes, train.shape
    arch = exp.model["arch"]
    scale = exp.model.get("input_scale") or "unit"
    clf = None
    if architectures.canonical(arch) not in architectures.ARCHITECTURES:
        architectures.build(arch, 1, (1, 1, 1))  # BadInput naming the known architectures
    if shape is not None and k is not None:
        try:
            with torch.device("meta"):  # shapes only: nothing is allocated
                net = architectures.build(arch, k, shape)
        except BadInput as e:
            raise BadInput(f"{exp.path} [model]: {e}") from None
        clf = Classifier(net, InputSpec(*shape, scale=scale), k, architectures.canonical(arch))
    out = {}
    for a in trained:
        triggers = [str(t) for t in as_list(a.options.get("trigger")) if t != "none"]
        _check_attack(exp, a, triggers, shape, k)
        out[a.name] = _Model(clf, k, bool(triggers),
                             f"attack {a.name} trains a clean model (no trigger), so it has none")
    return out


def _check_attack(exp: Experiment, a: AttackSpec, triggers: list[str], shape, k: int | None) -> None:
    """What `backdoorlab attack` checks of its triggers and targets, for this data."""
    from backdoorlab.attacks.runner import AttackPlan, build_triggers
    from backdoorlab.triggers.registry import parse_spec

    where = f"{exp.path} [[attack]] {a.name}"
    targets = [int(t) for t in as_list(a.options.get("target"))]
    mode = a.options.get("mode", "all2one")
    if mode == "all2all" and targets:
        raise BadInput(f"{where}: all-to-all attacks have no target (each label y maps to y+1)")
    if mode == "all2one" and triggers and not targets:
        raise BadInput(f"{where}: give the attack's target label (one per trigger)")
    if not triggers:
        if targets:
            raise BadInput(f"{where}: a target goes with a trigger (this attack has none)")
        return
    plan = AttackPlan(triggers=triggers, targets=targets, mode=mode)
    try:
        if shape is not None and k is not None:
            build_triggers(plan, shape, k)  # counts, target range, every spec built for the shape
            return
        # the image shape is known only once the data is read: what needs no shape now
        if mode == "all2one" and len(targets) != len(triggers):
            raise BadInput(f"{len(triggers)} trigger(s) but {len(targets)} target(s): give one target "
                           "per trigger")
        for t in targets:
            if t < 0 or (k is not None and t >= k):
                raise BadInput(f"target label {t} out of range for {k} classes")
        for spec in triggers:
            parse_spec(spec)
    except BadInput as e:
        raise BadInput(f"{where}: {e}") from None


# -- models handed over ---------------------------------------------------------------------------

def _given_model(exp: Experiment, a: AttackSpec) -> _Model:
    from backdoorlab.data.peek import peek_dataset
    from backdoorlab.models.files import load_model

    g = a.given or {}
    where = f"{exp.path} [[attack]] {a.name}"
    try:
        clf = load_model(g["model"], arch=g.get("arch"), input_scale=g.get("input_scale"))
    except BadInput as e:
        raise BadInput(f"{where}: model: {e}") from None
    splits = (("valid", "train"), ("test", "test"), ("poisoned", "test"), ("poisoned_valid", "train"),
              ("train", "train"))
    peeked = {}
    for key, split in splits:
        for src in as_list(g.get(key)):
            info = peeked[str(src)] = _peek(peek_dataset, str(src), split, None, f"{where} {key}")
            if info.shape is not None and info.shape != clf.spec.shape:
                raise BadInput(f"{where} {key} {src}: the model expects images of shape (H, W, C) = "
                               f"{clf.spec.shape}, got {info.shape}")
            if info.max_label is not None and info.max_label >= clf.num_classes:
                raise BadInput(f"{where} {key} {src}: label {info.max_label} is out of range for a model "
                               f"with {clf.num_classes} classes")
            if key in ("valid", "test", "train") and info.labeled is False:
                raise BadInput(f"{where} {key} {src}: {'a training set' if key == 'train' else 'clean data'} "
                               "needs labels; this data has none")
    for t in as_list(g.get("target")):
        if not 0 <= int(t) < clf.num_classes:
            raise BadInput(f"{where}: target label {t} out of range for the model's {clf.num_classes} "
                           f"classes (0..{clf.num_classes - 1})")
    from backdoorlab.poisoned import poisoned_set

    targets = as_list(g.get("target")) or [None] * len(as_list(g.get("poisoned")))
    for src, t in zip(as_list(g.get("poisoned")), targets, strict=True):  # the cell's rule, on labels
        stand_in = peeked[str(src)].label_stand_in(f"poisoned {src}")
        if stand_in is not None:
            try:
                poisoned_set(stand_in, t, g.get("poisoned_labels", "auto"), None, clf.num_classes)
            except BadInput as e:
                raise BadInput(f"{where}: {e}") from None
    return _Model(clf, clf.num_classes, bool(as_list(g.get("poisoned_valid"))),
                  f"attack {a.name} gives no poisoned_valid")


# -- defenses -------------------------------------------------------------------------------------

def _check_defense(exp: Experiment, d, a: AttackSpec, m: _Model) -> None:
    from backdoorlab import registry
    from backdoorlab.experiment.cells import _stage
    from backdoorlab.options import parse_labels

    where = f"{exp.path} [[defense]] {d.name} (on attack {a.name})"
    method = registry.get(d.method)
    if _stage(method.name, d.guide) == "guide" and not m.has_guide:
        raise BadInput(f"{where}: {method.name} with guide = \"poisoned\" needs the attack's poisoned "
                       f"validation images, and {m.why_no_guide} (guide = \"cleanse\" uses Neural "
                       "Cleanse's reversed triggers instead)")
    from backdoorlab.options import infos

    if m.clf is not None and "layer" in {i.name for i in infos(method.options)}:
        # a `layer` option names the layer a method prunes (prune, fine-prune, guided-prune,
        # nc-prune); unset, the network's default one, which a Keras graph may not name
        from backdoorlab.defenses.masking import resolve_target

        layer = d.options.get("layer")
        try:
            resolve_target(m.clf, layer if isinstance(layer, str) else None)
        except BadInput as e:
            raise BadInput(f"{where}: layer: {e}") from None
    if m.num_classes is None:
        return
    for what, text in (("labels", d.options.get("labels")), ("nc_labels", d.scan.get("labels"))):
        if isinstance(text, str):
            try:
                parse_labels(text, m.num_classes, what)
            except BadInput as e:
                raise BadInput(f"{where}: {e}") from None


def _peek(peek, source: str, split: str, size, where: str):
    try:
        return peek(source, split, size)
    except BadInput as e:
        raise BadInput(f"{where}: {e}") from None
