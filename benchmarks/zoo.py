"""The detection benchmark: every model detector (and `scan`'s combined verdict) on a model zoo.

The zoo (files in benchmarks/zoo/, each a `backdoorlab run` experiment, so it is cached and
resumable; an interrupted run only computes what it lacks):

- ``digits-small``: small_cnn on the bundled digits, seeds 0-4: clean, BadNets (4×4 → 0, 3×3
  top-left → 7), blend (α 0.2 → 3), WaNet (→ 5), two triggers (patch → 0, blend → 3);
- ``digits-short``: the same digits, 3 epochs (a smaller budget), seeds 10-11: clean, BadNets → 2;
- ``digits-gtsrb-cnn``: gtsrb_cnn on the digits, 20 epochs: clean, FTrojan → 1;
- ``gtsrb``: gtsrb_cnn on a seeded 8,000-image GTSRB sample, 4 epochs, clean, seeds 0-2;
- ``gtsrb-attacks``: the same, BadNets → 0, blend → 2, FTrojan → 8 (seed 0);
- ``gtsrb-attacks-more``: the same, WaNet → 0, BppAttack → 0, SIG → 2, Adaptive-Blend → 0,
  Adaptive-Patch → 0, label-consistent → 2 (seed 0; the attacks of issue #16);
- the five CSAW-HackML Keras BadNets of ../shared/data (data-free detectors only: no face data
  here); only the sunglasses target (0) is known.

Each detector runs at its defaults on the attack's clean validation split (the defender's data).
A model counts as backdoored when its attack implanted (test ASR ≥ 50 %); models whose attack did
not implant are listed and left out of the rates. Per detector: false flags on the clean models,
backdoored models flagged, the right target (the first flagged label is the attack's target; for
the two-trigger model one of its targets), AUROC of −log10 p (clean vs backdoored) with its ROC
curve, and the median time and image passes per model. ``scan`` is the combined verdict of
`backdoorlab.detectors.verdict` (Bonferroni over the detectors).

    nice python benchmarks/zoo.py [--only digits-small,gtsrb] [--no-run] [--no-csaw]

Writes the table between its markers in docs/detection.md, the ROC figure docs/img/zoo-roc.png,
and every row to runs/zoo/zoo.json; the detectors' rows are also merged into
benchmarks/results/zoo.json (committed), from which the table is made, so a fresh clone that
recomputes only some settings keeps the others' figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from doc_section import replace_section

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "benchmarks" / "zoo"
BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"
SETTINGS = ["digits-small", "digits-short", "digits-input-aware", "digits-gtsrb-cnn", "gtsrb",
            "gtsrb-attacks", "gtsrb-attacks-more"]
RECORD = ROOT / "benchmarks" / "results" / "zoo.json"
CSAW = {"sunglasses": ("sunglasses_bd_weights.h5", "unit", [0]),
        "anonymous_1": ("anonymous_1_bd_weights.h5", "unit", None),
        "anonymous_2": ("anonymous_2_bd_weights.h5", "unit", None),
        "multi_trigger": ("multi_trigger_multi_target_bd_weights.h5", "unit", None),
        "lab3": ("lab3_bd_weights.h5", "raw", None)}
COLUMNS = ("mm-bd", "neural-cleanse", "abs", "abs-release", "scan", "scan + abs")
IMPLANTED = 0.5  # test ASR at which an attack counts as implanted
ALPHA = 0.05


def data_dir() -> Path:
    return Path(os.environ.get("BACKDOORLAB_DATA", ROOT.parent / "shared" / "data"))


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def backdoorlab() -> list[str]:
    return [sys.executable, "-m", "backdoorlab"]


def run_cells(out: Path, name: str) -> list[dict] | None:
    """The cell records of the zoo setting ``name``: its run's results.json, or, for a run that was
    stopped before writing it, the finished cell folders whose key the setting's file plans now."""
    res_p = out / name / "results.json"
    if res_p.exists():
        return json.loads(res_p.read_text())["cells"]
    if not (out / name / "cells").is_dir():
        print(f"[zoo] {name}: no results yet ({res_p})")
        return None
    from grid_bench import planned_keys

    keys = set(planned_keys(ZOO / f"{name}.toml").values())
    cells = [json.loads(p.read_text()) for p in sorted((out / name / "cells").glob("*/cell.json"))]
    cells = [c for c in cells
             if c["key"] in keys and (out / name / "cells" / c["dir"] / "results.json").exists()]
    print(f"[zoo] {name}: run not finished; {len(cells)} finished cells read from its cell folders")
    return cells


def zoo_rows(out: Path, settings: list[str]) -> list[dict]:
    """One row per (model, detector) from the run folders."""
    rows = []
    for name in settings:
        cells = run_cells(out, name)
        if cells is None:
            continue
        models = {c["key"]: c for c in cells if c["cell"]["kind"] == "attack"}
        for c in cells:
            if c["cell"].get("spec", {}).get("family") != "model-detector":
                continue
            parent = models.get(c["cell"]["parent"])
            if parent is None:
                continue
            targets = parent["cell"]["spec"]["attack"].get("target")
            detail = json.loads((out / name / "cells" / c["dir"] / "results.json").read_text())
            rows.append({"setting": name, "attack": c["attack"] if "attack" in c else c["cell"]["attack"],
                         "seed": c["cell"]["seed"], "model": f"{name}/{parent['dir']}",
                         "detector": c["cell"].get("defense") or c["cell"]["spec"]["method"],
                         "targets": [targets] if isinstance(targets, int) else targets,
                         "asr": parent.get("asr"), "accuracy": parent.get("accuracy"),
                         "flagged": detail["flagged"], "backdoored": detail["backdoored"],
                         "p_value": detail.get("p_value"), "statistic": detail.get("statistic"),
                         "statistic_name": detail.get("statistic_name"),
                         "seconds": detail["cost"]["seconds"], "passes": detail["cost"]["image_passes"]})
    return rows


def csaw_rows(out: Path, compute: bool) -> list[dict]:
    from backdoorlab import registry

    revision = registry.get("mm-bd").revision
    rows = []
    folder = data_dir() / "csaw-hackml-2020"
    for name, (fname, scale, targets) in CSAW.items():
        path, dest = folder / fname, out / "csaw" / name
        done = dest / "results.json"
        # computed again when mm-bd's code now computes something else (its registry revision)
        current = done.exists() and json.loads(done.read_text()).get("revision", 0) == revision
        if not current and compute and path.exists():
            run(["nice", "-n", "10", *backdoorlab(), "detect", "mm-bd", str(path), "--arch",
                 "deepid", "--input-scale", scale, "--out", str(dest), "--overwrite"])
        if not done.exists():
            continue
        d = json.loads((dest / "results.json").read_text())
        rows.append({"setting": "csaw", "attack": name, "seed": None, "model": f"csaw/{name}",
                     "detector": "mm-bd", "targets": targets, "asr": None, "accuracy": None,
                     "flagged": d["flagged"], "backdoored": d["backdoored"], "p_value": d.get("p_value"),
                     "statistic": d.get("statistic"), "statistic_name": d.get("statistic_name"),
                     "seconds": d["cost"]["seconds"], "passes": d["cost"]["image_passes"]})
    return rows


def remember(rows: list[dict], path: Path = RECORD) -> list[dict]:
    """Merge this run's detector rows into the committed record (a row computed again replaces its
    record: same setting, attack, seed and detector) and return every recorded row. The run folders hold the
    models and do not outlive a fresh clone; the record keeps the zoo's table whole when only some
    settings are recomputed."""
    def ident(r: dict) -> tuple:  # one zoo model and detector, whatever its cache key
        return r["setting"], r["attack"], r["seed"], r["detector"]

    old = json.loads(path.read_text()) if path.is_file() else []
    new = {ident(r): r for r in rows}
    merged = [r for r in old if ident(r) not in new] + list(new.values())
    merged.sort(key=lambda r: (SETTINGS.index(r["setting"]) if r["setting"] in SETTINGS else len(SETTINGS),
                               r["model"], r["detector"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


SCAN_DEFAULT = ("mm-bd", "neural-cleanse")  # `scan`'s default set (detectors with a p-value)
SCANS = {"scan": SCAN_DEFAULT, "scan + abs": (*SCAN_DEFAULT, "abs")}


def with_scan(rows: list[dict]) -> list[dict]:
    """Add per model the combined verdicts of `detectors.verdict`: ``scan`` (the default set, as
    `backdoorlab scan` runs it) and ``scan + abs`` (with ``--detector`` naming all three), for the
    models every detector of the set answered."""
    from backdoorlab.detectors import Detection, verdict

    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["detector"]] = r
    out = list(rows)
    for have in by_model.values():
        for name, dets in SCANS.items():
            if not all(d in have for d in dets):
                continue
            rs = [have[d] for d in dets]
            res = {r["detector"]: Detection.recorded(r["flagged"], r["backdoored"], r["p_value"])
                   for r in rs}
            v = verdict(res, ALPHA)
            ps = [r["p_value"] for r in rs if r["p_value"] is not None]
            # ROC score: the Bonferroni-adjusted p-value; a flag by a detector without one counts
            # as p = 0 (it overrides the p-values, as in the verdict)
            ruled = any(r["backdoored"] for r in rs if r["p_value"] is None)
            p = 0.0 if ruled else (min(1.0, min(ps) * len(ps)) if ps else None)
            out.append({**rs[0], "detector": name, "flagged": v.targets, "backdoored": v.backdoored,
                        "p_value": p, "statistic": None, "statistic_name": None,
                        "seconds": sum(r["seconds"] for r in rs), "passes": sum(r["passes"] for r in rs)})
    return out


def kind(r: dict) -> str:
    if r["setting"] == "csaw":
        return "csaw"
    if not r["targets"]:
        return "clean"
    return "backdoored" if (r["asr"] or 0) >= IMPLANTED else "not implanted"


def right(r: dict) -> bool:
    return bool(r["flagged"]) and bool(r["targets"]) and r["flagged"][0] in r["targets"]


def score(r: dict) -> float:
    """ROC score: -log10 p, or a detector's own statistic where it has no p-value (ABS: REASR)."""
    if r["p_value"] is None and r.get("statistic") is not None:
        return float(r["statistic"])
    p = r["p_value"]
    return -math.log10(max(p, 1e-300)) if p is not None else (1.0 if r["backdoored"] else 0.0)


def order(det: str) -> tuple:
    return (det.startswith("scan"), det)


def summary(rows: list[dict]) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    out = []
    for det in sorted({r["detector"] for r in rows}, key=order):
        rs = [r for r in rows if r["detector"] == det and kind(r) in ("clean", "backdoored")]
        clean = [r for r in rs if kind(r) == "clean"]
        bd = [r for r in rs if kind(r) == "backdoored"]
        single = [r for r in bd if len(r["targets"]) == 1]
        y = [0] * len(clean) + [1] * len(bd)
        s = [score(r) for r in clean + bd]
        auc = roc_auc_score(y, s) if clean and bd else None
        out.append({"detector": det, "clean": len(clean), "false_flags": sum(r["backdoored"] for r in clean),
                    "backdoored": len(bd), "flagged": sum(r["backdoored"] for r in bd),
                    "single": len(single), "right_single": sum(r["backdoored"] and right(r) for r in single),
                    "right": sum(r["backdoored"] and right(r) for r in bd), "auroc": auc,
                    "median_s": statistics.median([r["seconds"] for r in rs]) if rs else None,
                    "median_passes": statistics.median([r["passes"] for r in rs]) if rs else None})
    return out


def roc_figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for det in sorted({r["detector"] for r in rows}, key=order):
        rs = [r for r in rows if r["detector"] == det and kind(r) in ("clean", "backdoored")]
        y = [int(kind(r) == "backdoored") for r in rs]
        if len(set(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, [score(r) for r in rs])
        ax.plot(fpr, tpr, label=det)
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("false-alarm rate (clean models)")
    ax.set_ylabel("detection rate (backdoored models)")
    ax.set_title("model zoo: ROC of −log10 p (abs: REASR)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pfmt(p: float) -> str:
    return f"{p:.2g}" if p > 0 else "< 1e-300"  # a null's survival function can underflow to 0


def pct(k: int, n: int) -> str:
    return f"{k}/{n}" + (f" ({100 * k / n:.0f} %)" if n else "")


def markdown(rows: list[dict], summ: list[dict]) -> str:
    n_models = len({r["model"] for r in rows if r["setting"] != "csaw"})
    n_csaw = len({r["model"] for r in rows if r["setting"] == "csaw"})
    lines = [BEGIN, "", f"{n_models} zoo models and {n_csaw} "
             "CSAW BadNets; each detector at its defaults, on the attack's clean validation split "
             f"(the defender's data). A model is backdoored when its attack implanted (test ASR ≥ "
             f"{100 * IMPLANTED:.0f} %). Verdicts at α = {ALPHA:g}; scan: `backdoorlab scan`'s "
             "default set, Bonferroni over mm-bd and neural-cleanse (0.025 each); abs: REASR ≥ 0.8 "
             "(no p-value) with the paper's neuron-only trigger objective, abs-release: the same "
             "with the label's cross-entropy added as in the authors' TrojAI scanner "
             "(`--logit-weight 1`); scan + abs: also backdoored when abs flags a label.", "",
             "| detector | false flags on clean models | backdoored models flagged | right target "
             "(single-target) | right target (all) | AUROC | median s / model | median image passes |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summ:
        auc = "—" if s["auroc"] is None else f"{s['auroc']:.3f}"
        lines.append(f"| {s['detector']} | {pct(s['false_flags'], s['clean'])} "
                     f"| {pct(s['flagged'], s['backdoored'])} | {pct(s['right_single'], s['single'])} "
                     f"| {pct(s['right'], s['backdoored'])} | {auc} "
                     f"| {s['median_s']:.1f} | {s['median_passes']:,.0f} |")
    lines += ["", "Per setting and attack (models flagged / models; the right target in brackets; "
              "median p-value; abs: median REASR):", "",
              "| setting | attack | targets | models | median ASR | " + " | ".join(COLUMNS) + " |",
              "|---|---|---|---|---|" + "---|" * len(COLUMNS)]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["setting"] != "csaw":
            groups.setdefault((r["setting"], r["attack"]), []).append(r)
    for (setting, attack), rs in groups.items():
        one = [r for r in rs if r["detector"] == rs[0]["detector"]]
        asr = [r["asr"] for r in one if r["asr"] is not None]
        cells = []
        for det in COLUMNS:
            d = [r for r in rs if r["detector"] == det]
            if not d:
                cells.append("—")
                continue
            ps = [r["p_value"] for r in d if r["p_value"] is not None]
            txt = f"{sum(r['backdoored'] for r in d)}/{len(d)}"
            if d[0]["targets"]:
                txt += f" [{sum(r['backdoored'] and right(r) for r in d)}]"
            stats_ = [r["statistic"] for r in d if r.get("statistic") is not None]
            if det.startswith("abs") and stats_:
                txt += f", REASR {statistics.median(stats_):.2f}"
            elif ps and det != "scan + abs":
                txt += f", p {pfmt(statistics.median(ps))}"
            cells.append(txt)
        tg = ", ".join(map(str, one[0]["targets"] or [])) or "—"
        med = f"{100 * statistics.median(asr):.1f} %" if asr else "—"
        note = " (not implanted)" if one and kind(one[0]) == "not implanted" else ""
        lines.append(f"| {setting} | {attack}{note} | {tg} | {len(one)} | {med} | "
                     + " | ".join(cells) + " |")
    csaw = [r for r in rows if r["setting"] == "csaw" and r["detector"] == "mm-bd"]
    if csaw:
        lines += ["", "CSAW-HackML BadNets (mm-bd from the weights alone; no face data here, so Neural "
                  "Cleanse and ABS cannot run):", "",
                  "| model | known target | p-value | flagged | s | image passes |",
                  "|---|---|---|---|---|---|"]
        for r in csaw:
            tg = ", ".join(map(str, r["targets"])) if r["targets"] else "not stated"
            fl = ", ".join(f"label {y}" for y in r["flagged"]) or "none"
            lines.append(f"| {r['attack']} | {tg} | {pfmt(r['p_value'])} | {fl} | {r['seconds']:.0f} | "
                         f"{r['passes']:,} |")
    lines += ["", "![ROC over the zoo](img/zoo-roc.png)", "", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "zoo"))
    ap.add_argument("--only", default=",".join(SETTINGS), help="comma list of zoo files (no .toml)")
    ap.add_argument("--no-run", action="store_true", help="only read what is computed")
    ap.add_argument("--no-csaw", action="store_true", help="skip the CSAW BadNets")
    ap.add_argument("--jobs", type=int, default=1, help="cells at a time (backdoorlab run --jobs)")
    ap.add_argument("--threads", type=int, help="torch threads per cell (backdoorlab run --threads)")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "detection.md"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    settings = [s for s in a.only.split(",") if s]
    if not a.no_run:
        for name in settings:
            run(["nice", "-n", "10", *backdoorlab(), "run", str(ZOO / f"{name}.toml"), "--out",
                 str(out / name), "--jobs", str(a.jobs), "--no-report",
                 *(["--threads", str(a.threads)] if a.threads else [])])
    rows = zoo_rows(out, SETTINGS)
    if not a.no_csaw:
        rows += csaw_rows(out, compute=not a.no_run)
    rows = with_scan(remember([r for r in rows if r["detector"] != "scan"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo.json").write_text(json.dumps(rows, indent=1))
    summ = summary(rows)
    for s in summ:
        print(s)
    doc = Path(a.doc)
    roc_figure(rows, doc.parent / "img" / "zoo-roc.png")
    replace_section(doc, markdown(rows, summ), BEGIN, END, head="# Detection on a model zoo\n\n")
    print(f"wrote {doc} and {doc.parent / 'img' / 'zoo-roc.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
