"""Build `report.md` and a self-contained `report.html` from any run folder backdoorlab wrote.

The builder reads every ``results.json`` in the folder and its sub-folders (attack, prune,
fine-prune, magnitude-prune, repair, detect, input-detect, cleanse, experiment, demo), renders one
section per run — tables, curves, trigger and reversed-trigger images — and a provenance section
(versions, seeds, input files with SHA-256). HTML embeds the images as data URIs, so the file can
be mailed as is.
"""

from __future__ import annotations

import base64
import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from backdoorlab.errors import BadInput
from backdoorlab.io import atomic_path, file_sha256

KIND_ORDER = ["demo", "experiment", "attack", "prune", "fine-prune", "magnitude-prune", "repair", "detect",
              "input-detect", "cleanse", "mitigate"]


@dataclass
class Section:
    title: str
    # ("p", text) | ("table", head, rows) | ("img", path, caption)
    blocks: list[tuple] = field(default_factory=list)

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, head: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", head, [[("—" if c is None else str(c)) for c in r] for r in rows]))

    def img(self, path: Path, caption: str) -> None:
        """A PNG backdoorlab wrote: a regular file (not a link) that starts like a PNG."""
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                if f.read(8) == b"\x89PNG\r\n\x1a\n":
                    self.blocks.append(("img", path, caption))


def pct(v) -> str:
    return "—" if v is None else f"{100 * float(v):.2f} %"


def kind_of(res: dict) -> str | None:
    if "kind" in res:
        return res["kind"]
    if res.get("command") == "prune" or "sweep" in res:
        return "prune"
    if "median" in res and "labels" in res and "flagged" in res:
        return "cleanse"
    return None


def _read(f: Path) -> dict:
    try:
        r = json.loads(f.read_text()) if f.is_file() and not f.is_symlink() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}
    return r if isinstance(r, dict) else {}


def find_runs(root: Path) -> list[tuple[str, Path, dict]]:
    runs = []
    for f in sorted([root / "results.json", *root.glob("*/results.json"), *root.glob("*/*/results.json")]):
        if not f.is_file():
            continue
        if f.is_symlink() or f.stat().st_size > 64 << 20:
            raise BadInput(f"{f}: not a results file backdoorlab wrote (a link, or over 64 MB)")
        try:
            res = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise BadInput(f"{f}: not valid JSON ({type(e).__name__})") from None
        kind = kind_of(res) if isinstance(res, dict) else None
        if kind:
            runs.append((kind, f.parent, res))
    runs.sort(key=lambda r: (KIND_ORDER.index(r[0]) if r[0] in KIND_ORDER else 99, str(r[1])))
    return runs


# -- sections per kind -------------------------------------------------------------------------

def attack_section(name: str, d: Path, r: dict) -> Section:
    s = Section(f"Attack: {name}")
    plan = r["settings"]["plan"]
    trig = ", ".join(f"`{t}` → {g}" for t, g in zip(plan["triggers"], plan["targets"] or ["y+1"] * 9,
                                                    strict=False)) or "none (clean reference)"
    s.p(f"Architecture {r['settings']['arch']}, {r['epochs']} epochs ({r['train_seconds']:.0f} s), "
        f"mode {plan['mode']}, poisoning rate {plan['rate']:.0%}, seed {r['settings']['seed']}. "
        f"Triggers: {trig}.")
    rows = [["clean test accuracy", pct(r["clean_accuracy"])],
            ["validation accuracy (clean)", pct(r["valid_accuracy"])]]
    for i, (a, q) in enumerate(zip(r["asr"], r["trigger_quality"], strict=False)):
        label = plan["triggers"][i] if i < len(plan["triggers"]) else plan["triggers"][0]
        rows.append([f"ASR `{label}`", pct(a)])
        if q.get("psnr_mean") is not None:
            ssim = f", SSIM {q['ssim_mean']:.3f}" if q.get("ssim_mean") is not None else ""
            rows.append([f"PSNR `{label}`", f"{q['psnr_mean']:.1f} dB{ssim}"])
    if r.get("pruning_aware"):
        pa = r["pruning_aware"]
        rows.append(["pruning-aware: channels pruned then reinstated", len(pa["pruned_channels"])])
    s.table(["figure", "value"], rows)
    s.img(d / "trigger_preview.png", "Top: clean test images; then per trigger the poisoned images and "
          "their difference from the clean ones ×10.")
    return s


def prune_section(name: str, d: Path, r: dict) -> Section:
    sw = r["sweep"]
    s = Section(f"Pruning defense: {name}")
    unit = "percentage points" if sw["drop_unit"] == "points" else "% relative"
    how = ("guided order (largest backdoored-minus-clean mean activation first)" if sw["order"] == "guided"
           else f"{sw['order']} order of mean activation on clean validation data")
    s.p(f"Layer {sw['layer']} (measured at {sw.get('measure_point') or sw['layer']}; "
        f"{sw['num_channels']} channels) pruned in {how}. Drops in {unit} of validation accuracy. "
        "B′ = pruned model, G = GoodNet (answers N when B and B′ disagree).")
    sets = sw.get("poisoned_sets") or []
    for d_ in sets:
        s.p(f"ASR on {d_['name']}: {d_['counted']:,} of {d_['total']:,} images; {d_['rule']}.")
    names = set_names(sets)
    n = len(names)
    steps = sw["steps"]
    base_asr = [x["asr"][0] for x in sets] if sets else [steps["asr"][0] if steps.get("asr") else None]
    rows = [["0 (unpruned)", 0, pct(steps["valid_accuracy"][0]),
             pct(steps["test_accuracy"][0] if steps.get("test_accuracy") else None),
             *map(pct, base_asr), "", *[""] * (2 * n)]]
    for t in sw["thresholds"]:
        if not t["reached"]:
            rows.append([f"{t['drop']:g}", "not reached", *[""] * (4 + 3 * n)])
            continue
        g = t.get("goodnet") or {}
        gsets = g.get("poisoned_sets") or [{"asr": g.get("asr"), "detection_rate": g.get("detection_rate")}]
        rows.append([f"{t['drop']:g}", t["pruned"], pct(t["valid_accuracy"]), pct(t["test_accuracy"]),
                     *map(pct, t.get("asr_sets") or [t["asr"]]), pct(g.get("clean_accuracy")),
                     *[pct(x["asr"]) for x in gsets], *[pct(x["detection_rate"]) for x in gsets]])
    s.table(["drop", "pruned channels", "valid acc", "B′ test acc", *[f"B′ ASR{x}" for x in names],
             "G test acc", *[f"G ASR{x}" for x in names], *[f"G detection{x}" for x in names]], rows)
    s.img(d / "curve.png", "Accuracy and attack success rate against the share of channels pruned.")
    return s


def set_names(sets: list[dict]) -> list[str]:
    """ASR column suffixes: none for zero or one poisoned set, " (name)" for each of several."""
    return [""] if len(sets) <= 1 else [f" ({x['name']})" for x in sets]


def stages_section(title: str, r: dict, what: str) -> Section:
    s = Section(title)
    s.p(what)
    names = set_names(r["before"].get("asr_sets") or [])
    rows = [[name, pct(st["valid_accuracy"]), pct(st.get("test_accuracy")),
             *[pct(x["asr"]) for x in st.get("asr_sets") or [{"asr": st.get("asr")}]]]
            for name, st in (("before", r["before"]), ("after pruning", r["after_pruning"]),
                             ("after fine-tuning", r["after_finetuning"]))]
    s.table(["model", "valid acc", "clean test acc", *[f"ASR{x}" for x in names]], rows)
    return s


def cleanse_section(name: str, d: Path, r: dict) -> Section:
    s = Section(f"Neural Cleanse: {name}")
    full = sorted((x for x in r["labels"] if x["stage"] == "full"), key=lambda x: x["norm"])
    flagged = r["flagged"]
    s.p(f"{len(r['labels'])} labels scanned ({len(full)} fully optimised, {r['mode']} mode) in "
        f"{r['seconds']:.0f} s, {r['passes']:,} image passes. Median mask L1 norm {r['median']:.2f}, "
        f"MAD {r['mad']:.2f}; labels with anomaly index > {r['threshold']:g} are flagged: "
        f"**{', '.join(map(str, flagged)) or 'none'}**.")
    if r.get("null_flag_rate") is not None:
        from backdoorlab.defenses.outliers import null_note

        s.p(null_note(r["null_flag_rate"], r["null_threshold_5pct"], r["threshold"]))
    rows = [[x["label"], f"{x['norm']:.2f}",
             "—" if x["anomaly_index"] is None else f"{x['anomaly_index']:.2f}",
             pct(x.get("asr")), "yes" if x["flagged"] else ""] for x in full[:10]]
    s.table(["label", "mask L1 norm", "anomaly index", "reversed-trigger ASR", "flagged"], rows)
    s.img(d / "norms.png", "Mask norms per label; flagged labels marked.")
    s.img(d / "smallest.png", "The smallest reversed triggers (mask, pattern, mask × pattern).")
    return s


def mitigate_section(name: str, d: Path, r: dict) -> Section:
    s = Section(f"Neural Cleanse mitigation: {name}")
    s.p(f"Reversed trigger(s) of label(s) {r.get('labels')}; figures on the user's test data.")
    names = set_names(r.get("poisoned_sets") or [])
    s.table(["method", "clean test acc", *[f"ASR{x}" for x in names], "detection rate"],
            [[m["method"], pct(m.get("clean_accuracy")),
              *[pct(x["asr"]) for x in m.get("asr_sets") or [{"asr": m.get("asr")}]],
              pct(m.get("detection_rate"))] for m in r["methods"]])
    return s


def repair_section(name: str, d: Path, r: dict) -> Section:
    """Any repair of the registry (``backdoorlab repair``): figures before and after, DER, cost."""
    s = Section(f"Repair {r['method']}: {name}")
    b, a = r["before"], r["after"]
    names = [x["name"] for x in b["sets"]]
    multi = len(names) > 1
    head = [f"clean {b.get('data', 'test')} acc"]
    for n in names:
        head += [f"ASR {n}" if multi else "ASR", f"robust acc {n}" if multi else "robust acc"]
    rows = []
    for label, f in (("before", b), (f"after {r['method']}", a)):
        row = [label, pct(f["clean_accuracy"])]
        for x in f["sets"]:
            row += [pct(x["asr"]), pct(x["robust_accuracy"])]
        rows.append(row)
    s.p(f"{r.get('paper', r['method'])}. {r.get('summary') or ''}".strip())
    s.table(["model", *head], rows)
    der = ", ".join("—" if x is None else f"{x:.3f}" for x in r.get("der_sets") or []) or "—"
    s.p(f"DER (BackdoorBench) {der}; the repair took {r['cost']['seconds']:.1f} s and "
        f"{r['cost']['image_passes']:,} image passes.")
    g = r.get("goodnet")
    if g:
        det = ", ".join(pct(x["detection_rate"]) for x in g["sets"])
        s.p(f"GoodNet (class N = backdoored): clean accuracy {pct(g['clean_accuracy'])}, "
            f"{pct(g['clean_flagged'])} of clean inputs flagged" + (f", detects {det} of the poisoned "
                                                                   "inputs." if det else "."))
    for note in r.get("notes") or []:
        s.p(f"Note: {note}")
    return s


def detect_section(name: str, d: Path, r: dict) -> Section:
    """Any model detector of the registry (``backdoorlab detect``)."""
    s = Section(f"Detect {r['method']}: {name}")
    verdict = "backdoored" if r["backdoored"] else "no backdoor found"
    right = {True: " — the attack's target", False: " — not the attack's target"}.get(
        r.get("right_target"), "")
    stat = "—" if r.get("statistic") is None else f"{r['statistic']:.3f}"
    s.p(f"{r.get('paper', r['method'])}. Verdict: **{verdict}**; flagged "
        f"{', '.join(map(str, r['flagged'])) or 'no label'}{right}. {r['statistic_name']} {stat}; "
        f"{r['cost']['seconds']:.1f} s, {r['cost']['image_passes']:,} image passes.")
    top = sorted(r["scores"].items(), key=lambda kv: -kv[1])[:10]
    s.table(["label", "score", "flagged"], [[y, f"{v:.2f}", "yes" if int(y) in r["flagged"] else ""]
                                            for y, v in top])
    s.img(d / "triggers.png", "Reversed triggers (mask, pattern, mask × pattern) of the flagged labels, "
          "else of the most suspicious ones.")
    return s


def scan_section(name: str, d: Path, r: dict) -> Section:
    """``backdoorlab scan``: the one verdict, the rule behind it, what each detector said."""
    s = Section(f"Scan: {name}")
    verdict = "backdoored" if r["backdoored"] else "no backdoor found"
    target = (f"; suspected target label(s) {', '.join(map(str, r['targets']))}" if r["targets"] else "")
    repeats = f" Each detector ran at {r['repeats']} seeds, merged." if r.get("repeats", 1) > 1 else ""
    s.p(f"Verdict: **{verdict}**{target}. Rule: {r['rule']}.{repeats}")
    rows = []
    for det_name, det in r["detectors"].items():
        stat = "—" if det.get("statistic") is None else f"{det['statistic']:.4g}"
        rows.append([det_name, ", ".join(map(str, det["flagged"])) or "none", det["statistic_name"], stat,
                     "yes" if det_name in r["significant"] else "no", f"{det['cost']['seconds']:.1f} s"])
    rows += [[det_name, f"skipped: {why}", "", "", "", ""] for det_name, why in r.get("skipped", {}).items()]
    s.table(["detector", "flags", "statistic", "value", "significant", "time"], rows)
    for det_name in r["detectors"]:
        s.img(d / f"triggers-{det_name}.png", f"{det_name}: reversed triggers (mask, pattern, mask × "
              "pattern) of the flagged labels, else of the most suspicious ones.")
    return s


def input_detect_section(name: str, d: Path, r: dict) -> Section:
    """Any input detector of the registry (``backdoorlab detect``): threshold, detection rate, false
    alarms, AUROC (per poisoned set when there are several), cost."""
    s = Section(f"Input detector {r['method']}: {name}")
    split = (r.get("details") or {}).get("clean_split") or {}
    s.p(f"{r.get('paper', r['method'])}. Score: {r['statistic']}. Fitted on "
        f"{split.get('fitted_on', 0):,} clean images; threshold {r['threshold']:.4g} set at "
        f"{pct(r['far_requested'])} false alarms on {split.get('threshold_set_on', 0):,} held-back "
        f"ones; {r['cost']['seconds']:.1f} s, {r['cost']['image_passes']:,} image passes.")
    auroc = "—" if r.get("auroc") is None else f"{r['auroc']:.4f}"
    rows = [["clean test inputs rejected (false alarms)", r["n_clean"], pct(r["far_measured"]), ""],
            ["poisoned test inputs rejected (detection)", r["n_poisoned"], pct(r["detection_rate"]), auroc]]
    per_set = (r.get("details") or {}).get("per_set") or {}
    if len(per_set) > 1:
        rows += [[f"  {k}", v["n"], pct(v["detection_rate"]),
                  "—" if v.get("auroc") is None else f"{v['auroc']:.4f}"] for k, v in per_set.items()]
    s.table(["inputs", "n", "rejected", "AUROC"], rows)
    return s


def inspect_section(name: str, d: Path, r: dict) -> Section:
    """Any data inspector of the registry (``backdoorlab inspect``): samples flagged, precision and
    recall against the known poisoned rows, the classes with the most flags, cost."""
    s = Section(f"Data inspector {r['method']}: {name}")
    n, k = r["n"], r["n_flagged"]
    text = (f"{r.get('paper', r['method'])}. Score: {r['statistic']}. Flagged {k:,} of {n:,} training "
            f"samples ({pct(k / n if n else None)}); {r['cost']['seconds']:.1f} s, "
            f"{r['cost']['image_passes']:,} image passes.")
    if r.get("n_poisoned") is not None:
        text += (f" Against the {r['n_poisoned']:,} poisoned rows ({r.get('truth_source') or 'known'}): "
                 f"precision {pct(r['precision'])}, recall {pct(r['recall'])}.")
    else:
        text += " The poisoned rows are unknown: precision and recall not measured."
    s.p(text)
    def flags(v: dict) -> int:  # spectral says "removed", AC "flagged"
        return int(v.get("flagged", v.get("removed", 0)) or 0)

    per = sorted(((int(y), v) for y, v in (r.get("per_class") or {}).items()), key=lambda kv: -flags(kv[1]))
    per = [(y, v) for y, v in per if flags(v)][:10]
    if per:
        s.table(["label", "samples", "flagged"], [[y, f"{v.get('n', 0):,}", f"{flags(v):,}"] for y, v in per])
    return s


def demo_section(d: Path, r: dict) -> Section:
    s = Section("Summary")
    s.p(r.get("summary", ""))
    if r.get("table"):
        s.table(r["table"]["head"], r["table"]["rows"])
    for t in r.get("tables", []):
        s.p(t["title"])
        s.table(t["head"], t["rows"])
    for v in r.get("verdicts", []):
        s.p(v)
    return s


def experiment_section(d: Path, r: dict) -> Section:
    s = Section(f"Experiment: {r.get('name', d.name)}")
    s.p(r.get("description", ""))
    s.table(r["table"]["head"], r["table"]["rows"])
    if r.get("detection_table"):
        from backdoorlab.experiment.summary import DETECTION_NOTE

        s.p(DETECTION_NOTE)
        s.table(r["detection_table"]["head"], r["detection_table"]["rows"])
    if r.get("input_detection_table"):
        from backdoorlab.experiment.summary import INPUT_DETECTION_NOTE

        s.p(INPUT_DETECTION_NOTE)
        s.table(r["input_detection_table"]["head"], r["input_detection_table"]["rows"])
    if r.get("inspection_table"):
        from backdoorlab.experiment.summary import INSPECTION_NOTE

        s.p(INSPECTION_NOTE)
        s.table(r["inspection_table"]["head"], r["inspection_table"]["rows"])
    for png, caption in (("heatmap_asr.png", "ASR after each repair, attack × defense (%)."),
                         ("heatmap_accuracy.png", "Change in clean accuracy by each repair, attack × "
                          "defense (points).")):
        s.img(d / png, caption)
    return s


def sections_for(root: Path) -> list[Section]:
    out: list[Section] = []
    for kind, d, r in find_runs(root):
        n = len(out)
        try:
            _add_sections(out, kind, d, r, root)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            del out[n:]
            raise BadInput(f"{d / 'results.json'}: not a {kind} results file this version can read "
                           f"({type(e).__name__}: {e})") from None
    return out


def display_name(d: Path, root: Path) -> str:
    """A section's name: "attack × defense, seed N" for a cell of a `run` grid (read from its
    cell.json), else the folder relative to the report's root."""
    cell = d / "cell.json"
    if cell.is_file() and not cell.is_symlink() and cell.stat().st_size < 1 << 20:
        try:
            c = json.loads(cell.read_text())["cell"]
            if c.get("defense"):
                return f"{c['attack']} × {c['defense']}, seed {c['seed']}"
            return f"{c['attack']}, seed {c['seed']}"
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            pass  # not one of ours after all: the folder name serves
    return str(d.relative_to(root)) if d != root else root.name


def _add_sections(out: list[Section], kind: str, d: Path, r: dict, root: Path) -> None:
    name = display_name(d, root)
    if kind == "attack":
        out.append(attack_section(name, d, r))
    elif kind == "prune":
        out.append(prune_section(name, d, r))
    elif kind == "fine-prune":
        out.append(stages_section(f"Fine-Pruning: {name}", r,
                                  f"Pruned {len(r['pruned_channels'])} of {r['num_channels']} channels "
                                  f"of {r['layer']}, then fine-tuned on clean validation data "
                                  f"({r['settings']['train']['epochs']} epochs)."))
    elif kind == "magnitude-prune":
        out.append(stages_section(f"Magnitude pruning: {name}", r,
                                  f"{r['pruned_weights']:,} of {r['total_weights']:,} kernel weights "
                                  f"zeroed ({r['sparsity']:.0%}, {r['scope']}), then fine-tuned."))
    elif kind == "detect":
        out.append(detect_section(name, d, r))
    elif kind == "scan":
        out.append(scan_section(name, d, r))
    elif kind == "input-detect":
        out.append(input_detect_section(name, d, r))
    elif kind == "inspect":
        out.append(inspect_section(name, d, r))
    elif kind == "repair":
        out.append(repair_section(name, d, r))
    elif kind == "cleanse":
        out.append(cleanse_section(name, d, r))
        mit = d / "mitigation" / "results.json"
        if mit.is_file():
            try:
                out.append(mitigate_section(name, mit.parent, json.loads(mit.read_text())))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadInput(f"{mit}: not valid JSON ({e})") from None
    elif kind == "mitigate":
        if d.name == "mitigation" and kind_of(_read(d.parent / "results.json")) == "cleanse":
            return  # shown with its Neural Cleanse scan (above)
        out.append(mitigate_section(name, d, r))
    elif kind == "demo":
        out.append(demo_section(d, r))
    elif kind == "experiment":
        out.append(experiment_section(d, r))


def provenance(root: Path) -> Section:
    import numpy
    import torch

    from backdoorlab import __version__

    s = Section("Provenance")
    s.table(["", ""], [["backdoorlab", __version__], ["torch", torch.__version__],
                       ["numpy", numpy.__version__], ["python", platform.python_version()],
                       ["platform", platform.platform()]])
    rows = []
    seeds = set()
    for _, d, r in find_runs(root):
        seed = (r.get("settings") or {}).get("seed", r.get("seed", (r.get("config") or {}).get("seed")))
        if seed is not None:
            seeds.add(seed)
        inputs = r.get("inputs") or {}
        for role, v in inputs.items():
            path = v.get("path") if isinstance(v, dict) else v
            if isinstance(v, dict) and "source" in v:
                path = v["source"]
            if not path:
                continue
            p = Path(str(path).split(":", 1)[-1]) if ":" in str(path) and not Path(str(path)).exists() \
                else Path(str(path))
            rows.append([d.name, role, str(path), _sha256(p) or "—"])
    if seeds:
        s.p(f"Seeds: {', '.join(map(str, sorted(seeds)))}.")
    if rows:
        s.table(["run", "input", "file", "SHA-256"], rows)
    return s


def _sha256(p: Path) -> str | None:
    digest = file_sha256(p)
    return None if digest is None else digest[:16] + "…"


# -- rendering (Jinja2 templates in report/templates) ---------------------------------------------

def _environment(root: Path | None = None):
    """The Jinja2 environment of the report templates (``report/templates``). HTML is autoescaped;
    the `inline` filter escapes a cell or paragraph, then turns ``**bold**`` and ``code`` marks into tags."""
    import jinja2
    from markupsafe import Markup, escape

    def inline(text: object) -> Markup:
        t = str(escape(str(text)))
        t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
        return Markup(re.sub(r"`(.+?)`", r"<code>\1</code>", t))

    def relative(path: Path) -> str:
        return (path.relative_to(root) if root and path.is_relative_to(root) else path).as_posix()

    env = jinja2.Environment(loader=jinja2.PackageLoader("backdoorlab.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html.j2"]),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters.update(inline=inline, relative=relative,
                       png_base64=lambda p: base64.b64encode(Path(p).read_bytes()).decode())
    return env


def render_md(title: str, sections: list[Section], root: Path) -> str:
    """The report as Markdown (template ``report.md.j2``); images are linked relative to ``root``."""
    text = _environment(root).get_template("report.md.j2").render(title=title, sections=sections)
    return re.sub(r"\n{3,}", "\n\n", text)


def render_html(title: str, sections: list[Section]) -> str:
    """The report as one self-contained HTML page (template ``report.html.j2``; images inlined)."""
    return _environment().get_template("report.html.j2").render(title=title, sections=sections)


def build_report(root: str | Path, title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``root``; returns their paths."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"{root}: no such folder")
    sections = sections_for(root)
    if not sections:
        raise BadInput(f"{root}: no backdoorlab results.json found (run attack, prune, fine-prune, "
                       "cleanse, run or demo first)")
    sections.append(provenance(root))
    title = title or f"backdoorlab report: {root.resolve().name}"
    md, hp = root / "report.md", root / "report.html"
    with atomic_path(md) as tmp:
        tmp.write_text(render_md(title, sections, root))
    with atomic_path(hp) as tmp:
        tmp.write_text(render_html(title, sections))
    return md, hp
