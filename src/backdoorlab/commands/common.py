"""Options and loaders shared by the CLI commands (parsing only; no algorithm)."""

from __future__ import annotations

import argparse

from backdoorlab.errors import BadInput
from backdoorlab.options import integer, number  # the commands' bounded option types


def shows_default(action: argparse.Action) -> bool:
    """Whether ``--help`` shows the default of ``action``: a value that says something (not None,
    nothing, or the off state of a plain switch)."""
    if isinstance(action, (argparse._StoreConstAction, argparse._CountAction, argparse._HelpAction,
                           argparse._VersionAction, argparse._SubParsersAction)):
        return False  # store_true / store_false are store_const
    d = action.default
    if d is None or d is argparse.SUPPRESS or (isinstance(d, (str, list)) and not d):
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The one help layout of every backdoorlab parser: each option's default is shown as
    ``(default: X)`` after its help (so help texts never state it by hand), and a description or
    epilog written with line breaks (a table of specs) is kept as written; one without is wrapped."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not shows_default(action):
            return text
        return text + " (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) and `HelpFormatter`; the sub-commands are
    made with ``parser_class=Parser`` (or ``type(p)``), so every parser has both."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


POSITIVE = integer(1)
EPOCHS = integer(1, 100_000)
NONNEGATIVE = integer(0)
LABEL = integer(0)
SEED = integer(0, 2**32 - 1)
FRACTION = number(0, 1, low_open=True, high_open=True)  # strictly between 0 and 1
LEARNING_RATE = number(0, 10, low_open=True)


def add_out_option(p: argparse.ArgumentParser, kind: str = "dir", help: str | None = None,
                   required: bool = True, default: str | None = None, metavar: str | None = None,
                   resumable: bool = False) -> None:
    """``--out`` (a folder, ``kind="dir"``, or a file) and ``--overwrite``, the same on every command.
    Commands check them first with `backdoorlab.io.check_out_dir` / `check_out_file`. A folder
    output holds the command's results.json: ``--json`` prints it (`add_json_option`)."""
    what = "output folder" if kind == "dir" else "output file"
    p.add_argument("--out", required=required, default=default, metavar=metavar or kind.upper(),
                   help=help or what)
    if kind == "dir":
        again = ("; an earlier run of this command in it is resumed without it, and with it is "
                 "deleted first" if resumable else "")
        text = ("replace an earlier backdoorlab output in --out" + again + " (a folder holding "
                "files backdoorlab did not make is never replaced)")
        add_json_option(p)
    else:
        text = "replace an existing output file"
    p.add_argument("--overwrite", action="store_true", help=text)


def add_json_option(p: argparse.ArgumentParser) -> None:
    """``--json``: print the command's ``results.json`` (the file it writes into ``--out``; schemas
    in docs/json.md) on stdout when it succeeds; its usual lines then go to stderr."""
    p.add_argument("--json", action="store_true", help="print results.json on stdout (the usual lines "
                   "go to stderr; schemas: docs/json.md)")
    p.set_defaults(json_results="results.json")


INPUT_OPTIONS = ("model", "data", "test_data", "clean", "valid", "test", "guide", "guide_triggers",
                 "poisoned")


def trigger_files(specs: list[str]) -> list[str]:
    """Picture files named by trigger specs (``image:glasses.png,…``, ``blend:kitty.png,…``)."""
    out = []
    for spec in specs:
        kind, _, rest = str(spec).partition(":")
        first = rest.split(",", 1)[0]
        if kind in ("image", "blend") and first and "=" not in first:
            out.append(first)
    return out


def check_out(args: argparse.Namespace, command: str, **kw) -> None:
    """Check ``--out`` (and ``--overwrite``) first in a command, before any import or work: see
    `backdoorlab.io.check_out_dir`. The command's input files are passed along so that
    ``--overwrite`` never deletes a folder holding one of them."""
    from backdoorlab.io import check_out_dir

    inputs: list[str] = []
    for name in INPUT_OPTIONS:
        v = getattr(args, name, None)
        inputs += [str(x) for x in (v if isinstance(v, list) else [v]) if x]
    inputs += trigger_files(getattr(args, "trigger", None) or [])
    if hasattr(args, "device"):  # a device that is not there: one line, before anything
        compute_from_args(args, say=False)
    check_out_dir(args.out, args.overwrite, command, inputs=inputs, **kw)


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="architecture of a Keras weights-only file (e.g. deepid)")
    p.add_argument("--input-scale", choices=["raw", "unit", "auto"], default=None,
                   help="pixel scale the network takes: raw = 0-255, unit = pixels/255, auto = "
                        "try both on the clean data and keep the more accurate (default: the "
                        "scale stored with the model; Keras files: unit)")
    add_compute_options(p)
    p.add_argument("--num-classes", type=integer(2, 1_000_000, "class count"),
                   help="class count, if it cannot be read from the "
                   "model file")


def add_compute_options(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--precision`` (`backdoorlab.device`), the same on every command that
    computes; `compute_from_args` checks them before any work."""
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="where to compute: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast precision of training, inference and the optimisation loops; bf16 "
                        "is faster on recent CPUs, fp16 needs a GPU")


def compute_from_args(args: argparse.Namespace, say: bool = True):
    """(device, precision) of ``--device`` / ``--precision``, checked. Unless they are the
    defaults (cpu, fp32), ``say`` prints the choice once on stderr — the first line of the
    command's output, and stdout stays clean for --json."""
    import sys

    from backdoorlab.device import check_precision, describe, resolve_device

    asked = (getattr(args, "device", None) or "cpu", getattr(args, "precision", None) or "fp32")
    device = resolve_device(asked[0])
    precision = check_precision(asked[1], device)
    if say and asked != ("cpu", "fp32") and not getattr(args, "_device_said", False):
        print(describe(device, precision), file=sys.stderr, flush=True)
        args._device_said = True
    return device, precision


def save_model_files(model, folder, stem: str, source: str, classes: int | None = None) -> list[str]:
    """Write ``stem.safetensors`` into ``folder`` and, when the model came from a Keras weights file
    (``source`` ends in .h5) with ``classes`` outputs (default: its own), ``stem.h5`` in that Keras
    layout too, for Keras users. Returns the names written, for the command's last line."""
    from pathlib import Path

    from backdoorlab.models.files import save_model

    save_model(model, Path(folder) / f"{stem}.safetensors")
    written = [f"{stem}.safetensors"]
    same = model.num_classes == (classes if classes is not None else model.num_classes)
    if Path(source).suffix.lower() in (".h5", ".hdf5") and same and getattr(model, "net", None) is not None:
        from backdoorlab.models.keras_h5 import save_keras_weights

        save_keras_weights(model, Path(folder) / f"{stem}.h5")
        written.append(f"{stem}.h5 (Keras weights)")
    return written


def add_data_options(p: argparse.ArgumentParser,
                     split_help: str = "which split of a data set that holds both (default: test for "
                                       "evaluation)") -> None:
    p.add_argument("--split", choices=["train", "test"], default=None, help=split_help)
    p.add_argument("--size", type=integer(1, 4096, "image size"),
                   help="resize images to SIZE x SIZE where the reader can")


def load_model_from_args(args: argparse.Namespace, clean=None):
    """Load the model named by ``args.model``; resolve ``--input-scale auto`` against ``clean``."""
    from backdoorlab.models.files import load_model

    device, precision = compute_from_args(args)
    scale = args.input_scale
    wanted = getattr(args, "num_classes", None)
    clf = load_model(args.model, arch=args.arch, input_scale=scale, num_classes=wanted)
    clf.to(device, precision)
    if wanted is not None and clf.num_classes != wanted:
        raise BadInput(f"--num-classes {wanted}: the model {args.model} has {clf.num_classes} classes")
    if scale == "auto":
        if clean is None:
            raise BadInput("--input-scale auto needs clean labeled data to decide")
        from backdoorlab.evaluation import check_compatible, choose_input_scale

        check_compatible(clf, clean, "clean data")
        clf, scores = choose_input_scale(clf, clean)
        print(f"input scale: auto chose {clf.spec.scale!r} (clean accuracy on a sample: "
              + ", ".join(f"{k} {v:.2%}" for k, v in scores.items()) + ")")
    return clf


def load_data(source: str, args: argparse.Namespace, default_split: str = "test",
              num_classes: int | None = None):
    from backdoorlab.data import load_dataset

    return load_dataset(source, split=getattr(args, "split", None) or default_split,
                        size=getattr(args, "size", None), num_classes=num_classes)


def add_poisoned_options(p: argparse.ArgumentParser,
                         what: str = "poisoned test data (reported only)") -> None:
    """--poisoned (repeatable), --target (one per set) and --poisoned-labels."""
    from backdoorlab.poisoned import LABEL_RULES

    p.add_argument("--poisoned", action="append", metavar="DATA",
                   help=f"{what}; repeat for several sets (e.g. one per trigger of a multi-trigger BadNet)")
    p.add_argument("--target", action="append", type=LABEL, metavar="LABEL",
                   help="attack target of each --poisoned set, repeated in the same order (default: "
                   "per-image targets in the file, else the label all its images share (CSAW "
                   "convention), else the most frequent prediction on it)")
    p.add_argument("--poisoned-labels", choices=LABEL_RULES, default="auto",
                   help="what the labels of a poisoned file are: true labels (inputs whose true label "
                   "is the target are left out), or the attack target (CSAW files: every input "
                   "counts); auto = target when all labels are one value, else true")


def load_poisoned(args: argparse.Namespace, clf, infer: bool = True) -> list:
    """The --poisoned sets as `PoisonedSet`s, checked against ``clf`` (call before long work).
    ``infer``: a set without a known target takes the most frequent prediction of ``clf``."""
    from backdoorlab.evaluation import check_compatible
    from backdoorlab.poisoned import poisoned_sets

    sources = getattr(args, "poisoned", None) or []
    if args.target and not sources:
        raise BadInput("--target is the target of a --poisoned set: give --poisoned too")
    datas = [load_data(s, args) for s in sources]
    for d in datas:
        check_compatible(clf, d, "poisoned data")
    return poisoned_sets(datas, args.target, args.poisoned_labels, clf=clf if infer else None,
                         num_classes=clf.num_classes)


def poisoned_lines(sets: list) -> list[str]:
    """One line per poisoned set: counts, target and the rule applied."""
    out = []
    for ps in sets:
        tgt = f"target {ps.target}" if ps.target is not None else "per-image targets"
        out.append(f"{ps.name}: {len(ps):,} of {ps.total:,} images count, {tgt}; {ps.rule}")
        out += [f"{ps.name}: {n}" for n in ps.notes]
    return out


def scale_hint(clf, accuracy: float, args: argparse.Namespace) -> None:
    """Print a hint when clean accuracy is near chance and the input scale was not chosen by auto."""
    import sys

    if getattr(args, "input_scale", None) == "auto" or accuracy > max(2 / clf.num_classes, 0.05):
        return
    print(f"hint: clean accuracy {accuracy:.2%} is near chance for {clf.num_classes} classes: the model "
          f"may expect another pixel scale than {clf.spec.scale!r}; try --input-scale auto",
          file=sys.stderr)
