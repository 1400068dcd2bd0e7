"""`backdoorlab cleanse`: Neural Cleanse detection (reverse-engineered triggers + MAD test)."""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from backdoorlab.commands.common import (
    EPOCHS,
    NONNEGATIVE,
    POSITIVE,
    SEED,
    add_data_options,
    add_model_options,
    add_out_option,
    add_poisoned_options,
    check_out,
    load_data,
    load_model_from_args,
    load_poisoned,
    number,
    poisoned_lines,
    save_model_files,
)
from backdoorlab.errors import BadInput
from backdoorlab.options import parse_labels  # labels "all", "0,3,5", "10-19"
from backdoorlab.tables import markdown, print_table

MITIGATIONS = ("unlearn", "prune", "filter")

MIN_IMAGES = 100  # below this many clean images the per-label figures are too coarse to trust


def _fmt(v: float | None, spec: str = ".2f") -> str:
    if v is None:
        return ""
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


_NONNEGATIVE_NUMBER = number(0)  # finite, >= 0 (nan, inf and negatives refused)


def _threshold(text: str) -> float | str:
    """argparse type of --threshold: a finite number >= 0, or 'auto'."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _NONNEGATIVE_NUMBER(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or 'auto'") from None


def _check_every(text: str) -> int | None:
    """argparse type of --check-every: a positive integer, or 'epoch' (None: once per epoch)."""
    if text.strip().lower() == "epoch":
        return None
    try:
        return POSITIVE(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or 'epoch'") from None


def write_tables(result, out: Path) -> None:
    """``table.csv`` (every label) and ``table.md`` (fully optimised labels, smallest norm first)."""
    from backdoorlab.defenses.outliers import null_note
    from backdoorlab.io import atomic_path

    full = result.full_labels()
    screened = sorted((r for r in result.labels if r.stage == "screen"),
                      key=lambda r: (r.screen_norm, r.label))
    cols = ["rank", "label", "stage", "norm", "anomaly_index", "flagged", "asr", "steps", "stop",
            "screen_norm", "screen_index", "screen_reached"]
    with atomic_path(out / "table.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for i, r in enumerate(full + screened, start=1):
            w.writerow([i, r.label, r.stage, _fmt(r.norm, ".4f"), _fmt(r.anomaly_index, ".4f"),
                        int(r.flagged), _fmt(r.asr, ".4f"), r.steps, r.stop or "",
                        _fmt(r.screen_norm, ".4f"), _fmt(r.screen_index, ".4f"),
                        "" if r.screen_reached is None else int(r.screen_reached)])
    lines = [
        f"# Neural Cleanse — {result.model}",
        "",
        f"Mode {result.mode}; {len(result.labels)} labels scanned, {len(full)} fully optimised; "
        f"{result.num_images} clean images ({result.input_scale} input scale). Median mask norm "
        f"{result.median:.2f}, MAD {result.mad:.2f} (over {len(result.reference_labels)} reference "
        f"labels); flagged: anomaly index > {result.threshold:.3g}.",
        "",
        "| rank | label | mask L1 norm | anomaly index | flagged | ASR of reversed trigger | steps |",
        "|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for i, r in enumerate(full, start=1):
        lines.append(f"| {i} | {r.label} | {_fmt(r.norm)} | {_fmt(r.anomaly_index)} | "
                     f"{'**yes**' if r.flagged else ''} | {_fmt(r.asr, '.2%')} | {r.steps} |")
    if screened:
        lines += ["", f"Screened only (fast mode, {len(screened)} labels; screen norms are from a "
                  "short round and not comparable with the table above), smallest 10: "
                  + ", ".join(f"{r.label} ({r.screen_norm:.1f})" for r in screened[:10]) + "."]
    lines += ["", f"Flagged labels: {', '.join(map(str, result.flagged)) or 'none'}.", ""]
    if result.null_flag_rate is not None:
        lines += [null_note(result.null_flag_rate, result.null_threshold_5pct, result.threshold,
                            result.p_value), ""]
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text("\n".join(lines))


def write_outputs(result, out: Path) -> list[str]:
    """Write tables, figures, triggers.npz and results.json into ``out`` (each atomically)."""
    from backdoorlab.defenses.neural_cleanse import save_triggers
    from backdoorlab.io import atomic_dir, write_json
    from backdoorlab.report.triggers_plot import plot_norms, plot_trigger_grid, save_trigger_pngs

    out.mkdir(parents=True, exist_ok=True)
    write_tables(result, out)
    full = result.full_labels()
    plot_norms([r.label for r in full], [r.norm for r in full], result.flagged, out / "norms.png",
               result.median, result.mad, result.threshold,
               title=f"Neural Cleanse mask norms ({result.mode} mode)")
    with atomic_dir(out / "masks") as tmp:
        for y, (m, p) in sorted(result.triggers.items()):
            save_trigger_pngs(tmp, y, m, p)
    items = [(r.label, *result.triggers[r.label],
              f"L1 {r.norm:.1f}, idx {_fmt(r.anomaly_index)}")
             for r in full[: max(1, result.config["top_k"])]]
    plot_trigger_grid(items, out / "smallest.png", title="smallest reversed triggers")
    save_triggers(result, out / "triggers.npz")
    files = ["table.md", "table.csv", "norms.png", "smallest.png", "masks/", "triggers.npz",
             "results.json", "state/"]
    write_json(out / "results.json", {"kind": "cleanse", **result.to_dict(), "outputs": files})
    return files


def cmd_cleanse(args: argparse.Namespace) -> int:
    check_out(args, "cleanse", in_place=True, resume=True,  # before any work
              own=("state", "masks", "mitigation"))
    for text, opt in ((args.labels, "--labels"), (args.mitigate_labels, "--mitigate-labels")):
        parse_labels(text, 2**31, opt)  # the syntax now; the range once the model is loaded
    mitigation_methods(args)
    from backdoorlab.defenses.neural_cleanse import NCConfig, neural_cleanse
    from backdoorlab.defenses.outliers import null_note
    from backdoorlab.evaluation import check_compatible

    clean = load_data(args.clean, args)
    clf = load_model_from_args(args, clean if clean.labeled else None)
    check_compatible(clf, clean, "clean data")
    cfg = NCConfig(mode=args.mode, labels=parse_labels(args.labels, clf.num_classes),
                   batch_size=args.batch, max_steps=args.steps, threshold=args.threshold,
                   seed=args.seed, num_images=args.images or None, check_every=args.check_every,
                   suspects=args.suspects, reference_labels=args.reference_labels,
                   screen_steps=args.screen_steps, labels_per_batch=args.labels_per_batch,
                   top_k=args.top_k)
    cfg.validate()  # before the output folder is marked
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a folder")
    plan = prepare_mitigation(args, clf, clean)
    print(f"model: {clf.describe()}")
    used = min(cfg.num_images or len(clean), len(clean))
    print(f"clean data: {used:,} of {len(clean):,} images used; mode {cfg.mode}")
    if used < MIN_IMAGES:
        print(f"warning: only {used} clean images: each label's trigger is optimised and its ASR "
              f"measured on them (ASR in steps of {1 / used:.1%}); Neural Cleanse's norms and anomaly "
              f"index are unreliable below about {MIN_IMAGES} images", file=sys.stderr)
    from backdoorlab.io import claim_now

    claim_now(out)  # everything is checked: marked (with --overwrite: emptied) before the scan
    res = neural_cleanse(clf, clean, cfg, state_dir=out / "state")
    write_outputs(res, out)
    full = res.full_labels()
    resumed = sum(r.resumed for r in res.labels)
    print(f"scanned {len(res.labels)} labels ({len(full)} fully optimised"
          + (f", {resumed} resumed from {out / 'state'}" if resumed else "") + f") in "
          f"{res.seconds:.0f} s; {res.passes:,} image passes")
    print(f"median mask norm {res.median:.2f}, MAD {res.mad:.2f}")
    print_table(["label", "mask norm", "anomaly index", "ASR (%)", "flagged"],
                [[str(r.label), f"{r.norm:.2f}", _fmt(r.anomaly_index), f"{100 * r.asr:.2f}",
                  "yes" if r.flagged else ""] for r in full[: cfg.top_k]],
                title=f"the {min(cfg.top_k, len(full))} smallest reversed triggers")
    if res.flagged:
        from backdoorlab.defenses.neural_cleanse import REPAIR_LABEL_TEXT, repair_labels

        print(f"flagged (anomaly index > {res.threshold:.3g}): {', '.join(map(str, res.flagged))}")
        used = repair_labels(res.flagged, res.label_p_values)
        why = REPAIR_LABEL_TEXT if res.label_p_values else "every flag (no calibrated p-values)"
        print(f"repairs given these triggers (--mitigate, repair --triggers) use label(s) "
              f"{', '.join(map(str, used))}: {why}")
    else:
        print(f"no label flagged (anomaly index > {res.threshold:.3g})")
    if res.null_flag_rate is not None:
        print(null_note(res.null_flag_rate, res.null_threshold_5pct, res.threshold, res.p_value))
    print(f"outputs: {out}/ (table.md, table.csv, norms.png, smallest.png, masks/, triggers.npz, "
          "results.json, state/)")
    if plan is not None:
        run_mitigation(args, clf, clean, res, out, plan)
    return 0


def mitigation_methods(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``--mitigate`` methods, the options that go with them checked (no model needed)."""
    if not args.mitigate:
        for opt in ("test", "poisoned", "mitigate_labels"):
            if getattr(args, opt):
                raise BadInput(f"--{opt.replace('_', '-')} is for --mitigate: give --mitigate too")
        return ()
    methods = tuple(m.strip() for m in args.mitigate.split(",") if m.strip())
    unknown = sorted(set(methods) - set(MITIGATIONS))
    if unknown or not methods:
        raise BadInput(f"--mitigate: unknown method(s) {unknown} (choose from {', '.join(MITIGATIONS)})")
    if not args.test:
        raise BadInput("--mitigate needs --test (clean test data to report on)")
    return methods


def prepare_mitigation(args: argparse.Namespace, clf, clean) -> dict | None:
    """Check every ``--mitigate`` option and load its data, before the scan starts."""
    from backdoorlab.evaluation import check_compatible
    from backdoorlab.train import TrainConfig

    methods = mitigation_methods(args)
    if not methods:
        return None
    labels = None
    if args.mitigate_labels:
        labels = parse_labels(args.mitigate_labels, clf.num_classes, "--mitigate-labels")
        scanned = parse_labels(args.labels, clf.num_classes)
        if scanned is not None and set(labels) - set(scanned):
            raise BadInput(f"--mitigate-labels {sorted(set(labels) - set(scanned))}: not among the "
                           "scanned --labels, so they get no reversed trigger")
    if not args.test:
        raise BadInput("--mitigate needs --test (clean test data to report on)")
    if not clean.labeled:
        raise BadInput("--mitigate needs labeled clean data (--clean) to fine-tune and calibrate on")
    if args.mitigate_epochs < 1:
        raise BadInput(f"--mitigate-epochs must be at least 1, got {args.mitigate_epochs}")
    test = load_data(args.test, args)
    check_compatible(clf, test, "test data")
    test.require_labels()
    from backdoorlab.repairs.nc_unlearn import Options as Unlearn  # the same defaults as the repair

    u = Unlearn()
    cfg = TrainConfig(epochs=args.mitigate_epochs, lr=u.lr, batch_size=u.batch_size, optimizer=u.optimizer,
                      schedule="none", seed=args.seed)
    return {"methods": methods, "labels": labels, "test": test, "poisoned": load_poisoned(args, clf),
            "cfg": cfg, "min_steps": u.min_steps}


def run_mitigation(args: argparse.Namespace, clf, clean, res, out: Path, plan: dict) -> None:
    """``--mitigate``: unlearning / neuron pruning / input filter with the reversed triggers."""
    from backdoorlab.defenses.nc_mitigation import mitigate
    from backdoorlab.defenses.neural_cleanse import repair_labels
    from backdoorlab.io import atomic_dir, write_json

    labels = plan["labels"] if plan["labels"] is not None else repair_labels(res.flagged, res.label_p_values)
    if not labels:
        print("mitigation: no label flagged, nothing to mitigate (name labels with --mitigate-labels)")
        return
    sets = plan["poisoned"]
    result, models = mitigate(clf, clean, plan["test"], res.triggers, labels, sets, None, plan["methods"],
                              plan["cfg"], args.seed, min_steps=plan["min_steps"])
    names = [""] if len(sets) <= 1 else [f" {ps.name}" for ps in sets]
    head = ["method", "clean test acc", *[f"ASR{n}" for n in names], "detection rate"]
    rules = [f"ASR on {line}." for line in poisoned_lines(sets)]
    body = [[m.method, _pct100(m.clean_accuracy),
             *([_pct100(d["asr"]) for d in m.asr_sets] or ["—"] * len(names)), _pct100(m.detection_rate)]
            for m in result.methods]
    lines = [f"Mitigation with the reversed trigger(s) of label(s) {', '.join(map(str, labels))}; "
             "figures in % on the test data.", *rules, "", markdown(head, body)]
    with atomic_dir(out / "mitigation") as tmp:
        written = [f for name, model in models.items()
                   for f in save_model_files(model, tmp, name, args.model, clf.num_classes)]
        (tmp / "table.md").write_text("\n".join(lines))
        write_json(tmp / "results.json", {"kind": "mitigate", **result.to_dict(),
                                          "poisoned_sets": [ps.describe() for ps in sets]})
    for line in rules:
        print(line)
    print_table(head, body, title="mitigation (figures in % on the test data)")
    print(f"mitigation outputs: {out / 'mitigation'}/ ({', '.join(written)}, table.md, results.json)")


def _pct100(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def register(sub) -> None:
    p = sub.add_parser(
        "cleanse", help="Neural Cleanse: reverse-engineer triggers, flag backdoor target labels",
        description="Neural Cleanse (Wang et al., IEEE S&P 2019): for each label, find the "
        "smallest mask and pattern that send clean images to it; labels whose mask is an outlier "
        "by the MAD test (anomaly index > --threshold) are flagged as backdoor targets. --mode fast "
        "(default) screens every label briefly and fully optimises the most suspicious ones plus "
        "a random sample for the median/MAD; --mode full optimises every label. Writes into --out: "
        "table.md, table.csv, norms.png, smallest.png, masks/label_<y>_{mask,pattern,masked}.png, "
        "triggers.npz (masks and patterns, for mitigation), results.json, and state/ (per-label "
        "results; re-running with the same --out resumes an interrupted scan).")
    p.add_argument("model", metavar="MODEL", help=".safetensors model or Keras .h5")
    p.add_argument("--clean", required=True, metavar="DATA",
                   help="clean images (labels optional; used for the search and the ASR)")
    add_out_option(p, resumable=True)
    p.add_argument("--labels", default="all", help="labels to scan: all, or e.g. 0,3,5 / 10-19")
    p.add_argument("--mode", choices=["fast", "full"], default="fast",
                   help="fast: screen + selection; full: optimise every label")
    p.add_argument("--steps", type=POSITIVE, default=None,
                   help="max mini-batch steps per label (default: 1000 epochs x images/batch)")
    p.add_argument("--batch", type=POSITIVE, default=32, help="images per label per step")
    p.add_argument("--images", type=NONNEGATIVE, default=1000,
                   help="clean images used, a seeded sample (0 = all)")
    p.add_argument("--threshold", type=_threshold, default=2.0,
                   help="flag labels with anomaly index above this; 'auto': the index a "
                        "network without a backdoor exceeds in only 5 %% of scans of this shape")
    p.add_argument("--check-every", type=_check_every, default=1, metavar="N|epoch",
                   help="mini-batch steps per cost-schedule check ('epoch' = once an epoch, as the "
                        "released code)")
    p.add_argument("--suspects", type=NONNEGATIVE, default=10,
                   help="fast mode: labels kept from the screen for full optimisation")
    p.add_argument("--reference-labels", type=POSITIVE, default=32,
                   help="fast mode: random labels fully optimised for the median/MAD")
    p.add_argument("--screen-steps", type=NONNEGATIVE, default=40,
                   help="fast mode: steps per label in the screen round")
    p.add_argument("--labels-per-batch", type=POSITIVE, default=None,
                   help="labels optimised together in one pass (default: 64 / --batch)")
    p.add_argument("--top-k", type=NONNEGATIVE, default=5, help="smallest triggers to show")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the image sample, the reference "
                   "labels, each label's starting mask and pattern, and the batch order")
    p.add_argument("--mitigate", metavar="METHODS", help="after detection, repair with the reversed "
                   "triggers of the flagged labels: comma list of unlearn, prune, filter")
    p.add_argument("--mitigate-labels", help="labels whose reversed triggers to use (default: the flagged "
                   "labels with a calibrated p-value <= 0.05, else the most anomalous flagged one)")
    p.add_argument("--mitigate-epochs", type=EPOCHS, default=10,
                   help="unlearning epochs (more when they make fewer than nc-unlearn's min_steps "
                   "optimiser steps), the best on held-back clean data kept")
    p.add_argument("--test", metavar="DATA", help="clean test data for the mitigation figures")
    add_poisoned_options(p, "poisoned test data for the mitigation figures")
    add_model_options(p)
    add_data_options(p)
    p.set_defaults(func=cmd_cleanse)
