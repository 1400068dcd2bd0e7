"""`backdoorlab prune`: the pruning defense (Fine-Pruning's pruning step) and its GoodNets."""

from __future__ import annotations

import argparse
import csv
import io
import platform
import time
from pathlib import Path

import numpy as np

from backdoorlab.commands.common import (
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
    poisoned_lines,
    scale_hint,
)
from backdoorlab.errors import BadInput
from backdoorlab.io import file_sha256
from backdoorlab.tables import print_table

DROP_HEADER = {"points": "drop (points)", "relative": "drop (% rel.)"}


def _parse_drops(text: str) -> tuple[float, ...]:
    from backdoorlab.defenses.pruning import parse_drops

    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise BadInput(f"--drops: an empty value in {text!r} (e.g. 2,4,10,30)")
    try:
        return parse_drops([float(p) for p in parts])
    except ValueError:
        raise BadInput(f"--drops: expected numbers separated by commas (e.g. 2,4,10,30), got {text!r}") \
            from None


def _check_guide_options(args: argparse.Namespace) -> None:
    given = [o for o in ("guide", "guide_triggers", "guide_labels") if getattr(args, o)]
    if args.order != "guided":
        if given:
            raise BadInput(f"--{given[0].replace('_', '-')} is for --order guided")
        return
    if bool(args.guide) == bool(args.guide_triggers):
        raise BadInput("--order guided needs exactly one of --guide (poisoned validation data) or "
                       "--guide-triggers (triggers.npz from 'backdoorlab cleanse')")
    if args.guide_labels and not args.guide_triggers:
        raise BadInput("--guide-labels picks reversed triggers: it goes with --guide-triggers")
    _guide_labels(args)


def _guide_labels(args: argparse.Namespace) -> list[int] | None:
    if not args.guide_labels:
        return None
    try:
        labels = [int(v) for v in args.guide_labels.split(",")]
    except ValueError:
        raise BadInput(f"--guide-labels: expected labels separated by commas (e.g. 0,3), got "
                       f"{args.guide_labels!r}") from None
    if any(v < 0 for v in labels):
        raise BadInput(f"--guide-labels: labels are >= 0, got {args.guide_labels!r}")
    return labels


def _tag(drop: float) -> str:
    return f"drop{drop:g}"


def _file_info(source: str | None) -> dict | None:
    if source is None:
        return None
    from backdoorlab.data import parse_source

    _, path = parse_source(source)
    p = Path(path)
    info: dict = {"source": source}
    if p.is_file():
        info["bytes"] = p.stat().st_size
    return info


def _pct(v: float | None) -> str:
    return "" if v is None or v != v else f"{100 * v:.2f}"


def _rows(res, extra: dict) -> list[dict]:
    """One row per drop threshold (plus the unpruned model); ``asr`` holds one ASR per poisoned set."""
    rows = [{"drop": "0 (unpruned)", "pruned": 0, "fraction": 0.0,
             "valid": res.valid_accuracy[0],
             "test": None if res.test_accuracy is None else res.test_accuracy[0],
             "asr": [a[0] for a in res.asr_sets], "g": None, "reached": True}]
    for t in res.thresholds:
        if not t.reached:
            rows.append({"drop": f"{t.drop:g}", "reached": False})
            continue
        rows.append({"drop": f"{t.drop:g}", "pruned": t.pruned, "fraction": t.pruned / res.num_channels,
                     "valid": t.valid_accuracy, "test": t.test_accuracy, "asr": t.asr_sets or [],
                     "g": extra.get(t.drop), "reached": True})
    return rows


def _set_names(res) -> list[str]:
    """Column suffixes: none for one poisoned set, the set's name for several."""
    sets = res.poisoned_sets
    return [""] if len(sets) <= 1 else [f" {d['name']}" for d in sets]


def _figures(res, r: dict) -> list[str]:
    """B' test accuracy, B' ASR per set, G test accuracy, G ASR and detection rate per set (in %)."""
    n = max(1, len(res.poisoned_sets))
    g = r.get("g")
    gsets = g.poisoned_sets if g else []
    b_asr = [_pct(v) for v in r["asr"]] or [""] * n
    g_asr = [_pct(d["asr"]) for d in gsets] or [""] * n
    g_det = [_pct(d["detection_rate"]) for d in gsets] or [""] * n
    return [_pct(r["test"]), *b_asr, _pct(g.clean_accuracy) if g else "", *g_asr, *g_det]


def _table_md(res, rows: list[dict]) -> str:
    names = _set_names(res)
    head = ["drop", "pruned channels", "fraction pruned (%)", "valid acc (%)", "B' clean test acc (%)",
            *[f"B' ASR{s} (%)" for s in names], "G clean test acc (%)",
            *[f"G ASR{s} (%)" for s in names], *[f"G detection rate{s} (%)" for s in names]]
    unit = "percentage points below" if res.drop_unit == "points" else "% (relative) of"
    lines = [
        f"Pruning {res.layer} (measured at {res.point or res.layer}; {res.num_channels} channels, "
        f"order: {res.order} mean activation on clean validation data).",
        f"Drop = validation accuracy {unit} the unpruned {100 * res.valid_accuracy[0]:.2f} %. "
        "B' = pruned model, G = GoodNet (class N = backdoored). Figures in %.",
        *[f"ASR on {d['name']}: {d['counted']:,} of {d['total']:,} images, "
          + (f"target {d['target']}" if d["target"] is not None else "per-image targets")
          + f"; {d['rule']}." for d in res.poisoned_sets],
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    max_drop = float(np.max(res.drop))
    for r in rows:
        if not r["reached"]:
            lines.append(f"| {r['drop']} | not reached (largest drop {max_drop:.2f}) |"
                         + " |" * (len(head) - 2))
            continue
        cells = [r["drop"], str(r["pruned"]), f"{100 * r['fraction']:.1f}", _pct(r["valid"]),
                 *_figures(res, r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_names(res) -> list[str]:
    return ["_" + "".join(c if c.isalnum() else "_" for c in s.strip()) if s else "" for s in _set_names(res)]


def _table_csv(res, rows: list[dict]) -> str:
    unit = "points" if res.drop_unit == "points" else "relative_pct"
    names = _csv_names(res)
    head = [f"drop_{unit}", "reached", "pruned_channels", "fraction_pruned", "valid_acc_pct",
            "bprime_clean_test_acc_pct", *[f"bprime_asr{s}_pct" for s in names],
            "goodnet_clean_test_acc_pct", *[f"goodnet_asr{s}_pct" for s in names],
            *[f"goodnet_detection_rate{s}_pct" for s in names]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for r in rows:
        if not r["reached"]:
            w.writerow([r["drop"], "no"] + [""] * (len(head) - 2))
            continue
        w.writerow([r["drop"].split(" ")[0], "yes", r["pruned"], f"{r['fraction']:.6f}",
                    _pct(r["valid"]), *_figures(res, r)])
    return buf.getvalue()


def _curve_csv(res) -> str:
    unit = "points" if res.drop_unit == "points" else "relative_pct"
    names = _csv_names(res) if res.asr_sets else [""]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "pruned_channels", "channel_pruned", "fraction_pruned", "valid_acc_pct",
                "clean_test_acc_pct", *[f"asr{s}_pct" for s in names], f"drop_{unit}"])
    for k in range(res.steps):
        asr = [_pct(a[k]) for a in res.asr_sets] or [""]
        w.writerow([k, int(res.pruned[k]), "" if k == 0 else int(res.ranking[k - 1]),
                    f"{res.fraction[k]:.6f}", _pct(res.valid_accuracy[k]),
                    "" if res.test_accuracy is None else _pct(res.test_accuracy[k]),
                    *asr, f"{res.drop[k]:.4f}"])
    return buf.getvalue()


def _print_table(res, rows: list[dict]) -> None:
    unit = "points" if res.drop_unit == "points" else "% rel."
    n = max(1, len(res.poisoned_sets))
    tags = [""] if n == 1 else [f"{i + 1}" for i in range(n)]
    head = [f"drop ({unit})", "pruned", "valid", "B test", *[f"B ASR{t}" for t in tags], "G test",
            *[f"G ASR{t}" for t in tags], *[f"G det{t}" for t in tags]]
    body = [[r["drop"], "not reached"] if not r["reached"]
            else [r["drop"], str(r["pruned"]), _pct(r["valid"]), *_figures(res, r)] for r in rows]
    print()
    print_table(head, body, title="all figures in %; B = pruned model, G = GoodNet (class N = backdoored)")
    if n > 1:
        print("poisoned sets: " + ", ".join(f"{t} = {d['name']}" for t, d in zip(tags, res.poisoned_sets,
                                                                            strict=True)))


def cmd_prune(args: argparse.Namespace) -> int:
    check_out(args, "prune")  # before any import, loading or work
    _check_guide_options(args)
    from backdoorlab.defenses.goodnet import goodnet_predictions, make_goodnet, metrics_from_predictions
    from backdoorlab.defenses.masking import apply_channel_mask
    from backdoorlab.defenses.pruning import UNITS, poisoned_key, prune_sweep
    from backdoorlab.io import atomic_dir, write_json
    from backdoorlab.models.files import save_model
    from backdoorlab.report.curves import plot_sweep

    t_start = time.perf_counter()
    drops = _parse_drops(args.drops)
    out = Path(args.out)
    save_keras = None
    if args.save_format == "keras":
        from backdoorlab.models import keras_h5

        save_keras = getattr(keras_h5, "save_keras_weights", None)
        if save_keras is None:
            raise BadInput("--save-format keras: Keras export is unavailable in this version")
    valid = load_data(args.valid, args, default_split="train")
    clf = load_model_from_args(args, valid)
    test = load_data(args.test, args) if args.test else None
    poisoned = load_poisoned(args, clf)
    t_load = time.perf_counter() - t_start
    print(f"model:      {clf.describe()}")
    sets = f"validation {len(valid):,}" + (f", test {len(test):,}" if test else "") + \
        "".join(f", poisoned {ps.total:,}" for ps in poisoned)
    print(f"images:     {sets}")
    for line in poisoned_lines(poisoned):
        print(f"poisoned:   {line}")
    ranking = None
    if args.order == "guided":
        from backdoorlab.defenses.guided_pruning import guided_ranking, stamp_reversed_triggers

        if args.guide:
            backdoored = load_data(args.guide, args, default_split="train")
        else:
            labels = _guide_labels(args)
            backdoored = stamp_reversed_triggers(valid, args.guide_triggers, labels)
        ranking, _ = guided_ranking(clf, valid, backdoored, args.layer)
        print(f"guided:     channels ranked by activation on {len(backdoored):,} backdoored inputs "
              "minus clean ones")
    res = prune_sweep(clf, valid, test, poisoned, layer=args.layer, order=args.order,
                      drops=drops, drop_unit=args.drop_unit, stop=args.stop, seed=args.seed,
                      batch_size=args.batch_size, ranking=ranking)
    print(f"layer:      {res.layer} ({res.num_channels} channels, measured at "
          f"{res.point or res.layer}; method {res.method}); swept {res.steps - 1} channels in "
          f"{res.timings['total_seconds']:.1f} s")
    scale_hint(clf, float(res.valid_accuracy[0]), args)  # step 0 = the unpruned model
    for note in res.notes:
        print(f"note:       {note}")

    t_save = time.perf_counter()
    g_metrics: dict = {}
    thresholds_out = []
    with atomic_dir(out) as tmp:
        for t in res.thresholds:
            entry = t.to_dict()
            if not t.reached:
                thresholds_out.append(entry)
                continue
            pruned = apply_channel_mask(clf, res.layer, t.mask)
            pruned.provenance["pruning"] = {
                "defense": "pruning (Liu et al., Fine-Pruning, RAID 2018)", "source": args.model,
                "drop": t.drop, "drop_unit": res.drop_unit, "order": res.order, "step": t.step}
            tag = _tag(t.drop)
            files = {"pruned": save_model(pruned, tmp / f"pruned_{tag}.safetensors").name}
            if save_keras is not None:
                files["pruned_keras"] = Path(save_keras(pruned, tmp / f"pruned_{tag}.h5")).name
            goodnet = make_goodnet(clf, pruned)
            files["goodnet"] = save_model(goodnet, tmp / f"goodnet_{tag}.safetensors").name
            entry["files"] = files
            if test is not None:
                preds = res.predictions[t.step]
                base = res.predictions[0]
                n = clf.num_classes
                g_test = goodnet_predictions(base["test"], preds["test"], n)
                g_pois = [goodnet_predictions(base[k], preds[k], n)
                          for k in map(poisoned_key, range(len(poisoned)))]
                m = metrics_from_predictions(g_test, test.require_labels(), n, g_pois, poisoned)
                g_metrics[t.drop] = m
                entry["goodnet"] = m.to_dict()
            thresholds_out.append(entry)
        rows = _rows(res, g_metrics)
        (tmp / "table.md").write_text(_table_md(res, rows))
        (tmp / "table.csv").write_text(_table_csv(res, rows))
        (tmp / "curve.csv").write_text(_curve_csv(res))
        plot_sweep(res, tmp / "curve.png")
        sweep = res.to_dict()
        sweep["thresholds"] = thresholds_out
        results = {
            "command": "prune",
            "settings": {"model": args.model, "arch": clf.arch, "input_scale": clf.spec.scale,
                         "layer": res.layer, "measure_point": res.point, "order": res.order,
                         "drops": list(drops), "drop_unit": res.drop_unit, "stop": res.stop,
                         "seed": res.seed, "batch_size": args.batch_size, "target": res.target,
                         "poisoned_labels": args.poisoned_labels,
                         "save_format": args.save_format},
            "units": {"accuracy, asr, detection_rate in JSON": "share in [0, 1]",
                      "tables and curve.csv": "%", "drop": UNITS[res.drop_unit]},
            "inputs": {"model": {"path": args.model, "sha256": file_sha256(args.model)},
                       "valid": _file_info(args.valid), "test": _file_info(args.test),
                       "poisoned": [_file_info(s) for s in args.poisoned or []]},
            "sweep": sweep,
            "timings": {"load_seconds": t_load, **res.timings,
                        "save_seconds": time.perf_counter() - t_save},
            "machine": {"python": platform.python_version(), "platform": platform.platform()},
        }
        results["timings"]["command_seconds"] = time.perf_counter() - t_start
        write_json(tmp / "results.json", results)
    _print_table(res, rows)
    print(f"\nwrote {out}/ (table.md, table.csv, curve.csv, curve.png, results.json, models)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "prune", help="pruning defense: sweep a layer's channels, save repaired models and GoodNets",
        description="Prune the last conv layer of MODEL channel by channel in order of increasing mean "
        "activation on clean --valid data (Liu et al., Fine-Pruning, RAID 2018), recording validation "
        "accuracy, clean --test accuracy and the attack success rate on --poisoned data after every "
        "channel. The models where validation accuracy first drops by each of --drops are saved, each "
        "with its GoodNet (class N = backdoored: B and the pruned B' disagree).")
    p.add_argument("model", metavar="MODEL", help=".safetensors model or Keras .h5")
    p.add_argument("--valid", required=True, metavar="DATA", help="clean labeled validation data "
                   "(ranks the channels and defines the drops)")
    p.add_argument("--test", metavar="DATA", help="clean labeled test data (reported only)")
    add_poisoned_options(p)
    p.add_argument("--layer", help="layer to prune (default: the architecture's last conv layer, "
                   "e.g. conv_3 for DeepID)")
    p.add_argument("--order", choices=["increasing", "decreasing", "abs", "random", "guided"],
                   default="increasing",
                   help="pruning order by mean activation on the validation data ("
                   "abs = increasing mean absolute activation; random uses --seed; guided = largest "
                   "backdoored-minus-clean activation first, needs --guide or --guide-triggers)")
    p.add_argument("--guide", metavar="DATA", help="guided: poisoned validation data the defender holds")
    p.add_argument("--guide-triggers", metavar="NPZ", help="guided: triggers.npz written by 'backdoorlab "
                   "cleanse' (reversed triggers stamped on the clean validation images)")
    p.add_argument("--guide-labels", help="guided: which reversed triggers to use (default: all in the file)")
    p.add_argument("--drops", default="2,4,10,30", help="validation accuracy drops at which to save a "
                   "model, comma list, in --drop-unit")
    p.add_argument("--drop-unit", choices=["points", "relative"], default="points",
                   help="points = percentage points below the unpruned validation accuracy; "
                   "relative = %% of it")
    p.add_argument("--stop", choices=["all", "max_drop"], default="all",
                   help="all: prune every channel; max_drop: stop once the largest drop is reached")
    p.add_argument("--save-format", choices=["native", "keras"], default="native",
                   help="keras: also write the pruned models as Keras HDF5 weights (GoodNets stay native)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of --order random")
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="images per forward batch")
    add_out_option(p, help="output folder (written atomically)")
    add_model_options(p)
    add_data_options(p)
    p.set_defaults(func=cmd_prune)
