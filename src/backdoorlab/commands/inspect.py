"""`backdoorlab inspect METHOD MODEL --data TRAIN`: any registered data inspector
(`backdoorlab.inspectors`): which training samples look poisoned, per-class findings and the cost;
when the poisoned rows are known (``--truth``, or the record `backdoorlab poison --rate` writes
into its h5) the precision and recall of the flagged rows."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np

from backdoorlab.commands.common import (
    add_data_options,
    add_model_options,
    add_out_option,
    load_data,
    load_model_from_args,
)
from backdoorlab.errors import BadInput

POISON_ATTR = "backdoorlab_poison"  # the JSON record `backdoorlab poison` writes
MAX_TRUTH_BYTES = 1 << 30
SHOWN_CLASSES = 10


def read_truth_file(path: str) -> np.ndarray:
    """Poisoned row indices from a .json (a list, or an object with ``indices`` as in
    `PoisonInfo.to_dict`) or a .npy file (a 1-D integer array; never unpickled)."""
    from backdoorlab.safe_read import MAX_TEXT_BYTES, read_bytes

    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        raw = read_bytes(path, MAX_TEXT_BYTES, "truth file")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(f"--truth {path}: not valid JSON ({e})") from None
        if isinstance(obj, dict):
            obj = obj.get("indices", obj.get("poisoned_index"))
        if not isinstance(obj, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                for v in obj):
            raise BadInput(f"--truth {path}: expected a JSON list of row indices (or an object "
                           "with 'indices')")
        return np.asarray(obj, dtype=np.int64)
    if suffix == ".npy":
        raw = read_bytes(path, MAX_TRUTH_BYTES, "truth file")
        try:
            a = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception as e:  # ValueError for pickled objects, others for corrupt headers
            raise BadInput(f"--truth {path}: not a readable .npy array ({e})") from None
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "iu":
            raise BadInput(f"--truth {path}: expected an integer array of row indices")
        return a
    raise BadInput(f"--truth {path}: expected a .json or .npy file of poisoned row indices")


def truth_from_h5(data) -> tuple[np.ndarray | None, str]:
    """(poisoned row indices, where from) from a CSAW h5 written by `backdoorlab poison --rate`,
    else (None, why not)."""
    from backdoorlab.safe_read import h5_dataset, h5_read, open_h5

    path = data.meta.get("path") if data.meta.get("format") == "csaw" else None
    if not path:
        return None, "unknown (give --truth for precision and recall)"
    with open_h5(path) as f:
        record = f.attrs.get(POISON_ATTR)
        if record is None:
            return None, "unknown (the file holds no poisoning record; give --truth)"
        try:
            info = json.loads(record if isinstance(record, str) else bytes(record).decode())
        except (TypeError, ValueError, UnicodeDecodeError) as e:
            raise BadInput(f"{path}: unreadable attribute {POISON_ATTR!r} ({e})") from None
        if not isinstance(info, dict) or info.get("plan") != "train" or "poisoned_index" not in f:
            return None, ("unknown (the file is a poisoned evaluation set, not a training set; "
                          "give --truth)")
        rows = h5_read(h5_dataset(f, "poisoned_index", str(path), kinds="iu", ndim=(1,)), str(path))
    return rows.astype(np.int64), f"the poisoning record in {Path(path).name} ('poisoned_index')"


def _per_class_lines(res, labels: np.ndarray, truth: np.ndarray | None) -> list[str]:
    ins = res.inspection
    counts = np.bincount(labels[ins.flagged], minlength=int(labels.max()) + 1) if len(ins.flagged) \
        else np.zeros(int(labels.max()) + 1, dtype=np.int64)
    poisoned = np.bincount(labels[truth], minlength=len(counts)) if truth is not None and len(truth) \
        else None
    hit = np.zeros(len(counts), dtype=np.int64)
    if truth is not None and len(ins.flagged):
        rows = np.intersect1d(ins.flagged, truth)
        hit = np.bincount(labels[rows], minlength=len(counts))
    order = [int(y) for y in np.argsort(-counts, kind="stable") if counts[y] > 0]
    if poisoned is not None:  # classes holding poison come first when nothing was flagged there
        order += [int(y) for y in np.flatnonzero(poisoned) if counts[y] == 0]
    lines = []
    for y in order[:SHOWN_CLASSES]:
        figures = {k: v for k, v in ins.per_class.get(y, {}).items()
                   if k not in ("n", "flagged", "removed") and v is not None}
        n = ins.per_class.get(y, {}).get("n", int((labels == y).sum()))
        text = f"  label {y}: {counts[y]:,} of {n:,} flagged"
        if poisoned is not None:
            text += f" ({hit[y]:,} of them poisoned" + (f"; the class holds {poisoned[y]:,} poisoned)"
                                                       if poisoned[y] else ")")
        if figures:
            text += "; " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in figures.items())
        lines.append(text)
    rest = len(order) - SHOWN_CLASSES
    if rest > 0:
        lines.append(f"  … {rest} more classes with flagged samples (results.json, per_class)")
    if not order:
        lines.append("  no class")
    return lines


def cmd_inspect(args: argparse.Namespace) -> int:
    from backdoorlab.io import check_out_dir

    check_out_dir(args.out, args.overwrite, "inspect",  # before any loading or work
                  inputs=[str(x) for x in (args.model, args.data, args.truth) if x])
    from backdoorlab import registry
    from backdoorlab.evaluation import check_compatible
    from backdoorlab.inspectors import check_truth, inspect
    from backdoorlab.io import atomic_dir, write_json
    from backdoorlab.options import from_args

    method = registry.get(args.method, "data-inspector")
    opts = from_args(method.options, args)
    truth = read_truth_file(args.truth) if args.truth else None  # a bad file fails before loading
    data = load_data(args.data, args, default_split="train")
    labels = data.require_labels()
    clf = load_model_from_args(args, data)
    check_compatible(clf, data, "training set")
    if truth is not None:
        truth, source = check_truth(truth, len(data), f"--truth {args.truth}"), f"--truth {args.truth}"
    else:
        truth, source = truth_from_h5(data)
        if truth is not None:
            truth = check_truth(truth, len(data), source)
    print(f"model:      {clf.describe()}")
    print(f"inspector:  {method.name} ({method.paper}) on {len(data):,} training images, "
          f"{data.num_classes} classes")
    print("truth:      " + (f"{len(truth):,} poisoned rows, from {source}" if truth is not None else source))
    res = inspect(method.name, clf, data, opts, truth)
    ins = res.inspection
    n = len(data)
    lines = [f"flagged:    {len(ins.flagged):,} of {n:,} samples ({len(ins.flagged) / n:.2%})",
             f"statistic:  {ins.statistic}",
             "per class (most flagged first):", *_per_class_lines(res, labels, truth)]
    if truth is not None:
        hits = len(np.intersect1d(ins.flagged, truth))
        prec = "—" if res.precision is None else f"{res.precision:.2%}"
        rec = "—" if res.recall is None else f"{res.recall:.2%}"
        lines.append(f"precision:  {prec} ({hits:,} of the {len(ins.flagged):,} flagged are poisoned)")
        lines.append(f"recall:     {rec} ({hits:,} of the {len(truth):,} poisoned are flagged)")
    lines.append(f"cost:       {res.seconds:.1f} s, {res.passes:,} image passes")
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        np.save(tmp / "flagged.npy", ins.flagged.astype(np.int64))
        np.save(tmp / "scores.npy", ins.scores.astype(np.float64))
        (tmp / "summary.txt").write_text("\n".join(lines) + "\n")
        write_json(tmp / "results.json", {**res.to_dict(), "paper": method.paper,
                                          "truth_source": source if truth is not None else None,
                                          "inputs": {"model": args.model, "data": args.data,
                                                     "truth": args.truth}})
    print("\n".join(lines))
    print(f"wrote {out}/ (results.json, flagged.npy, scores.npy, summary.txt)")
    return 0


def register(sub) -> None:
    from backdoorlab import registry
    from backdoorlab.options import add_arguments

    p = sub.add_parser("inspect", help="which training samples are poisoned? any registered data "
                       "inspector (see 'backdoorlab list')",
                       description="Run one data inspector on a (possibly poisoned) training set and a "
                       "model trained on it: the samples it flags, per-class findings, precision and "
                       "recall when the poisoned rows are known, wall time and image passes.")
    methods = p.add_subparsers(dest="method", metavar="METHOD", parser_class=type(p))
    for m in registry.methods("data-inspector"):
        q = methods.add_parser(m.name, help=m.summary.replace("%", "%%"),  # argparse %-formats help
                               description=f"{m.summary}. {m.paper}.")
        q.add_argument("model", metavar="MODEL", help="the model trained on the data "
                       "(.safetensors or Keras .h5)")
        q.add_argument("--data", required=True, metavar="TRAIN",
                       help="the labelled training set (PATH or FORMAT:PATH; default split: train)")
        q.add_argument("--truth", metavar="FILE",
                       help="poisoned row indices (.json list or .npy), if known (only scores the "
                       "answer; read from the file itself for an h5 written by 'backdoorlab poison "
                       "--rate')")
        add_arguments(q, m.options)
        add_out_option(q)
        add_model_options(q)
        add_data_options(q)
        q.set_defaults(func=cmd_inspect)
