"""The cells of an experiment grid, their content keys, and how one cell is computed.

A cell is one attack model (attack × seed) or one defense applied to one attack model
(attack × defense × seed). Its key is the SHA-256 of everything its result depends on: the
options of the cell itself, the key of the model it starts from (for a defense), a fingerprint
of the data files (path, size and modification time of every file), the seed and the
backdoorlab version. A finished cell is a folder ``cells/<label>-<key[:12]>/`` holding the
command's usual outputs and, written last, ``cell.json``; a cell whose ``cell.json`` exists with
the same key is not computed again, so a re-run recomputes only cells whose inputs changed.

Each cell runs the same code as the corresponding command (``attack``, ``repair``, ``cleanse``,
``detect``), in-process, its output captured in ``logs/<label>.log``. Which command a defense cell
runs follows the registered family of its method (`defense_args`): a repair, a model detector or an
input detector.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from backdoorlab import __version__
from backdoorlab.errors import BadInput
from backdoorlab.experiment.config import Experiment, family_options
from backdoorlab.poisoned import as_list


@dataclass
class Cell:
    key: str
    label: str            # readable name, e.g. "badnets-fine-pruning-s0"
    kind: str             # "attack" or a defense kind
    attack: str
    defense: str | None
    seed: int
    spec: dict            # what the cell computes (options), part of the key
    parent: str | None    # key of the attack cell a defense starts from

    @property
    def dirname(self) -> str:
        return f"{self.label}-{self.key[:12]}"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def family(self) -> str | None:
        """The registry family of a defense cell's method (None for attack, given and scan cells)."""
        if self.kind in ("attack", "given", "scan"):
            return None
        return self.spec.get("family", "repair")  # repairs' specs leave it out (their keys predate it)


# families whose cells judge the attack model (or its training data) without changing it: their own
# summary tables
DETECTOR_FAMILIES = ("model-detector", "input-detector", "data-inspector")


def resolved_options(method: str, given: dict) -> dict:
    """Every option of a registered method: the given values over the method's defaults."""
    from dataclasses import asdict

    from backdoorlab import registry
    from backdoorlab.options import from_mapping

    return asdict(from_mapping(registry.get(method).options, given, f"defense {method}"))


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def data_fingerprint(source: str) -> dict:
    """Identity of a data source by content: the data format, and a BLAKE2b digest over every file's
    relative path and bytes (about 1.5 s for the 51,904 files of GTSRB on this project's laptop).

    Modification times and the folder's location are left out on purpose: a copied, restored or
    moved data set is the same data, and its cached cells stay valid.
    """
    from backdoorlab.data import parse_source

    fmt, path = parse_source(source)
    if fmt == "digits" or source == "digits":
        return {"source": "digits"}
    p = Path(path)
    if not p.exists():
        raise BadInput(f"data source {source}: {p} does not exist")
    h = hashlib.blake2b()
    n = 0
    files = [p] if p.is_file() else sorted(
        Path(root) / f for root, _dirs, names in os.walk(p) for f in names)
    for f in files:
        rel = "" if f == p else os.path.relpath(f, p)
        h.update(f"{rel}\0".encode())
        fd = hashlib.blake2b()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                fd.update(chunk)
        h.update(fd.digest())
        n += 1
    return {"format": fmt, "files": n, "content": h.hexdigest()}


def plan_cells(exp: Experiment) -> list[Cell]:
    """Every cell of the grid, attack cells first (defense cells name their parent's key)."""
    from backdoorlab import registry
    from backdoorlab.defenses.neural_cleanse import REPAIR_LABEL_RULE

    trains = any(a.given is None for a in exp.attacks)
    # data inspectors read the poisoned training set: only then do the attack cells write it (and
    # only then is it part of their key, so grids without inspectors keep their cached models)
    inspects = any(registry.get(d.method).family == "data-inspector" for d in exp.defenses)
    data_id = {"data": {k: v for k, v in exp.data.items() if k not in ("source", "test")},
               "train_data": data_fingerprint(exp.data["source"]) if trains else None,
               "test_data": data_fingerprint(exp.data["test"]) if exp.data.get("test") else None}
    cells: list[Cell] = []
    for seed in exp.seeds:
        for a in exp.attacks:
            if a.given is not None:
                files = {k: [data_fingerprint(x) for x in v] if isinstance(v, list) else data_fingerprint(v)
                         for k, v in a.given.items()
                         if k in ("model", "valid", "test", "poisoned", "poisoned_valid", "train")}
                key = digest({"kind": "given", "version": __version__, "seed": seed, "given": a.given,
                              "files": files})
                cells.append(Cell(key, f"{a.name}-s{seed}", "given", a.name, None, seed, dict(a.given), None))
            else:
                spec = {"data": exp.data, "model": exp.model, "train": exp.train, "attack": a.options}
                ident = {"kind": "attack", "version": __version__, "seed": seed, "data_id": data_id,
                         "model": exp.model, "train": exp.train, "attack": a.options,
                         "data": data_id["data"]}
                if exp.compute:  # cpu/fp32 files keep their keys
                    spec["compute"] = ident["compute"] = exp.compute
                if inspects:
                    spec["save_train"] = ident["save_train"] = True
                key = digest(ident)
                cells.append(Cell(key, f"{a.name}-s{seed}", "attack", a.name, None, seed, spec, None))
            scans: dict[str, Cell] = {}
            for d in exp.defenses:
                dspec: dict = {"method": d.method, "options": d.options}
                if exp.compute:
                    dspec["compute"] = exp.compute
                family = registry.get(d.method).family
                if family != "repair":
                    dspec["family"] = family
                    if d.family_options:  # e.g. an input detector's far
                        dspec["family_options"] = d.family_options
                elif "backdoored" in registry.get(d.method, "repair").needs:
                    dspec["guide"] = d.guide
                parent = key
                if _stage(d.method, d.guide) == "scan":  # one Neural Cleanse scan per options, shared
                    sspec = {"scan": d.scan, **({"compute": exp.compute} if exp.compute else {})}
                    skey = digest({"kind": "scan", "version": __version__, "seed": seed, "parent": key,
                                   **sspec})
                    if skey not in scans:
                        scans[skey] = Cell(skey, f"{a.name}-nc-s{seed}", "scan", a.name, None, seed, sspec,
                                           key)
                        cells.append(scans[skey])
                    parent = skey
                # keyed on every option's value, defaults included: a method whose default changes
                # in a new release is computed again, and spelling out a default changes nothing
                keyed = {**dspec, "options": resolved_options(d.method, d.options)}
                if parent != key:  # repairs with the scan's triggers: the rule picking their labels
                    keyed["repair_label_rule"] = REPAIR_LABEL_RULE
                revision = registry.get(d.method).revision
                if revision:  # a method whose code changed what it computes (registry.register)
                    keyed["revision"] = revision
                fam_defaults = {k: kw.get("default") for k, kw in family_options(family).items()}
                if fam_defaults:  # the family's own options (an input detector's far), defaults too
                    keyed["family_options"] = {**fam_defaults, **d.family_options}
                dkey = digest({"kind": "defense", "version": __version__, "seed": seed, "parent": parent,
                               "defense": keyed})
                cells.append(Cell(dkey, f"{a.name}-{d.name}-s{seed}", d.method, a.name, d.name, seed,
                                  dspec, parent))
    return cells


# -- running one cell -----------------------------------------------------------------------------

def _flags(options: dict) -> list[str]:
    """{"batch_size": 64, "clean_label": True, "trigger": ["a", "b"]} -> CLI flags."""
    out: list[str] = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if v:
                out.append(flag)
        elif isinstance(v, list):
            for item in v:
                out += [flag, str(item)]
        else:
            out += [flag, str(v)]
    return out


def attack_args(cell: Cell) -> list[str]:
    s = cell.spec
    data = s["data"]
    args = ["attack", "--data", data["source"], "--arch", s["model"]["arch"], "--seed", str(cell.seed)]
    if data.get("test"):
        args += ["--test-data", data["test"]]
    args += _flags({k: v for k, v in data.items() if k not in ("source", "test")})
    args += _flags({k: v for k, v in s["model"].items() if k != "arch"})
    args += _flags(s["train"])
    args += _flags(s["attack"])
    if s.get("save_train"):
        args.append("--save-train")
    return args


def _stage(method: str, guide: str | None = "poisoned") -> str | None:
    """What a method needs before it runs, from its registered needs: ``"scan"`` (a Neural Cleanse
    scan for reversed triggers), ``"guide"`` (the attack's poisoned validation images) or None."""
    from backdoorlab import registry

    m = registry.get(method)
    if m.family != "repair":
        return None
    needs = m.needs
    if "triggers" in needs or ("backdoored" in needs and guide == "cleanse"):
        return "scan"
    if "backdoored" in needs or "poisoned" in needs:
        return "guide"
    return None


def scan_args(cell: Cell, model_dir: Path, out: Path, pres: dict) -> list[str]:
    """The Neural Cleanse scan of a scan cell (its options from the defenses' ``nc_`` keys)."""
    files = pres["files"]
    return ["cleanse", str(model_dir / files["model"]), "--clean", str(model_dir / files["clean_valid"]),
            "--seed", str(cell.seed), *_flags(cell.spec["scan"]), "--out", str(out)]


def attack_targets(pres: dict) -> list[int]:
    """The attack's target label(s), as its results.json records them ([] for all-to-all)."""
    given = as_list(pres.get("target"))
    if given:
        return [int(t) for t in given]
    plan = (pres.get("settings") or {}).get("plan") or {}
    return [] if plan.get("mode") == "all2all" else [int(t) for t in plan.get("targets") or []]


def _seeded(method, cell: Cell) -> dict:
    """The cell's method options, with the cell's seed where the method has a seed option."""
    from backdoorlab.options import infos

    opts = dict(cell.spec["options"])
    if "seed" in {i.name for i in infos(method.options)}:
        opts["seed"] = cell.seed
    return opts


def _poisoned_args(model_dir: Path, pres: dict) -> list[str]:
    """--poisoned for every poisoned test set of the attack (one per trigger), each with its
    --target when one was given, and the label rule of a given model's files."""
    files = pres["files"]
    pz = []
    for f in files["poisoned_test"]:
        pz += ["--poisoned", str(model_dir / f)]
    for t in as_list(pres.get("target")) if files["poisoned_test"] else []:
        pz += ["--target", str(t)]
    if pres.get("poisoned_labels", "auto") != "auto":
        pz += ["--poisoned-labels", pres["poisoned_labels"]]
    return pz


def defense_args(cell: Cell, model_dir: Path, out: Path, pres: dict, scan_dir: Path | None = None
                 ) -> list[str]:
    """The command line of a defense cell, by the registered family of its method."""
    if cell.family == "model-detector":
        return detect_args(cell, model_dir, out, pres)
    if cell.family == "input-detector":
        return input_detect_args(cell, model_dir, out, pres)
    if cell.family == "data-inspector":
        return inspect_args(cell, model_dir, out, pres)
    return repair_args(cell, model_dir, out, pres, scan_dir)


def detect_args(cell: Cell, model_dir: Path, out: Path, pres: dict) -> list[str]:
    """``backdoorlab detect METHOD`` on the model, scored against the attack's target(s)."""
    from backdoorlab import registry
    from backdoorlab.options import to_flags

    files = pres["files"]
    method = registry.get(cell.spec["method"], "model-detector")
    opts = _seeded(method, cell)
    targets = [x for t in attack_targets(pres) for x in ("--target", str(t))]
    clean = ["--clean", str(model_dir / files["clean_valid"])] if "clean" in method.needs else []
    return ["detect", method.name, str(model_dir / files["model"]), *clean, *targets,
            *to_flags(method.options, opts), "--out", str(out)]


def input_detect_args(cell: Cell, model_dir: Path, out: Path, pres: dict) -> list[str]:
    """``backdoorlab detect METHOD`` of an input detector: fitted, and its threshold set, on the
    attack's clean validation split; false alarms measured on its clean test set, the detection
    rate on its poisoned test set(s); the family's own options (``--far`` …) as the file sets them."""
    from backdoorlab import registry
    from backdoorlab.options import to_flags

    files = pres["files"]
    method = registry.get(cell.spec["method"], "input-detector")
    return ["detect", method.name, str(model_dir / files["model"]), "--clean",
            str(model_dir / files["clean_valid"]), "--test", str(model_dir / files["clean_test"]),
            *_poisoned_args(model_dir, pres), *_flags(cell.spec.get("family_options", {})),
            *to_flags(method.options, _seeded(method, cell)), "--out", str(out)]


def inspect_args(cell: Cell, model_dir: Path, out: Path, pres: dict) -> list[str]:
    """``backdoorlab inspect METHOD`` on the training set the attack model was trained on (written
    by the attack cell, or a given model's ``train``); its poisoning record is the truth the flagged
    rows are scored against."""
    from backdoorlab import registry
    from backdoorlab.options import to_flags

    files = pres["files"]
    if not files.get("train"):
        raise BadInput(f"{cell.label}: {cell.spec['method']} needs the model's training set, and this "
                       "attack's outputs hold none")
    method = registry.get(cell.spec["method"], "data-inspector")
    return ["inspect", method.name, str(model_dir / files["model"]),
            "--data", str(model_dir / files["train"]), *to_flags(method.options, _seeded(method, cell)),
            "--out", str(out)]


def repair_args(cell: Cell, model_dir: Path, out: Path, pres: dict, scan_dir: Path | None = None
                ) -> list[str]:
    """``backdoorlab repair METHOD`` on the model in ``model_dir``, with what the method needs
    (registered needs): the attack's poisoned validation images, or the reversed triggers of the
    scan in ``scan_dir`` (``{flagged}`` stands for the labels to repair with,
    `backdoorlab.defenses.neural_cleanse.repair_labels` of the scan's flags)."""
    from backdoorlab import registry
    from backdoorlab.options import to_flags

    files = pres["files"]
    spec = cell.spec
    method = registry.get(spec["method"], "repair")
    opts = _seeded(method, cell)
    pz = _poisoned_args(model_dir, pres)
    held: list[str] = []
    stage = _stage(method.name, spec.get("guide"))
    if stage == "scan":
        assert scan_dir is not None
        held = ["--triggers", str(scan_dir / "triggers.npz"), "--trigger-labels", "{flagged}"]
    elif stage == "guide":
        if not files.get("poisoned_valid"):
            raise BadInput(f"{cell.label}: {method.name} with guide = \"poisoned\" needs a backdoored "
                           "model's poisoned validation images (this attack has none)")
        held = ["--guide", str(model_dir / files["poisoned_valid"][0])]
    return ["repair", method.name, str(model_dir / files["model"]), "--valid",
            str(model_dir / files["clean_valid"]), "--test", str(model_dir / files["clean_test"]), *pz,
            *held, *to_flags(method.options, opts), "--out", str(out)]


def _run_cli(args: list[str], log) -> None:
    from backdoorlab.cli import main

    print("$ backdoorlab " + " ".join(args), file=log, flush=True)
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGTERM) if main_thread else None
    if main_thread:  # the command installs its own SIGTERM handler (stops like Ctrl-C) for its run
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            rc = main(args)
        except SystemExit as e:  # argparse refusing an option
            rc = e.code if isinstance(e.code, int) else 2
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, saved)
    if rc != 0:
        log.flush()
        lines = Path(log.name).read_text(encoding="utf-8", errors="replace").splitlines()
        why = next((ln for ln in reversed(lines) if "error:" in ln), f"exit status {rc}")
        if rc == EXIT_IO:  # a full disk (or an I/O error) stops the whole grid, not one cell
            no = errno.ENOSPC if "disk full" in why else errno.EIO
            raise OSError(no, os.strerror(no), _written(why))
        what = " ".join(args[:2]) if args[0] in ("repair", "detect") else args[0]
        raise BadInput(f"backdoorlab {what} failed: {why.strip()}")


EXIT_IO = 74  # `backdoorlab.cli.EXIT_IO`


def _written(line: str) -> str | None:
    """The file a disk-full line of the CLI names ("disk full while writing FILE (…)"), if any."""
    head, sep, rest = line.partition("while writing ")
    return rest.rsplit(" (", 1)[0] if sep else None


def check_options(cells: list[Cell]) -> None:
    """Parse every cell's command line before anything runs, so an option typo costs no training."""
    import io

    from backdoorlab.cli import build_parser

    parser = build_parser()
    fake = {"model": "m.safetensors", "clean_valid": "v.h5", "clean_test": "t.h5",
            "poisoned_test": ["p.h5"], "poisoned_valid": ["pv.h5"], "train": "train.h5"}
    for c in cells:
        if c.kind == "given":
            continue
        if c.kind == "attack":
            lines = [[*attack_args(c), "--out", "x"]]
        elif c.kind == "scan":
            lines = [scan_args(c, Path("parent"), Path("x"), {"files": fake})]
        else:
            lines = [defense_args(c, Path("parent"), Path("x"), {"files": fake}, Path("scan"))]
        for args in lines:
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    parser.parse_args([a if a != "{flagged}" else "0" for a in args])
            except SystemExit:
                msg = err.getvalue().strip().splitlines()
                raise BadInput(f"{c.label}: {msg[-1] if msg else 'bad options'}") from None


def _flagged_text(flagged: list[int]) -> str:
    """"flagged label 0" / "flagged labels 0, 4" / "flagged no label" (never a bare number)."""
    if not flagged:
        return "flagged no label"
    return f"flagged label{'s' if len(flagged) > 1 else ''} {', '.join(map(str, flagged))}"


def _input_detect_text(res: dict) -> str:
    """"detects 97.0 % of 270 poisoned inputs; 4.7 % of 300 clean ones rejected (5.0 % set);
    AUROC 0.991" — what `detect` measured (— where it had no data)."""
    def rate(v) -> str:
        return "—" if v is None else f"{100 * v:.1f} %"

    auroc = "—" if res["auroc"] is None else f"{res['auroc']:.3f}"
    return (f"detects {rate(res['detection_rate'])} of {res['n_poisoned']:,} poisoned inputs; "
            f"{rate(res['far_measured'])} of {res['n_clean']:,} clean ones rejected "
            f"({rate(res['far_requested'])} set); AUROC {auroc}")


def _inspect_text(res: dict) -> str:
    """"flags 1,890 of 35,249 training samples; precision 93.1 %, recall 95.0 % of 1,860 poisoned"."""
    def rate(v) -> str:
        return "—" if v is None else f"{100 * v:.1f} %"

    text = f"flags {res['n_flagged']:,} of {res['n']:,} training samples"
    if res.get("n_poisoned") is not None:
        text += (f"; precision {rate(res['precision'])}, recall {rate(res['recall'])} of "
                 f"{res['n_poisoned']:,} poisoned")
    return text


def _summary(cell: Cell, d: Path, parent_dir: Path | None) -> dict:
    """Figures for the summary table: clean test accuracy and ASR, before and after."""
    res = json.loads((d / "results.json").read_text()) if (d / "results.json").exists() else {}
    if cell.kind in ("attack", "given"):
        asr = res["asr"][0] if res.get("asr") else None
        triggers = ((res.get("settings") or {}).get("plan") or {}).get("triggers") or []
        return {"accuracy": res["clean_accuracy"], "asr": asr, "detail": "",
                "asr_per_trigger": list(res.get("asr") or []), "triggers": list(triggers)}
    if cell.kind == "scan":
        flagged = res.get("flagged", [])
        return {"accuracy": None, "asr": None, "flagged": flagged,
                "detail": _flagged_text(flagged)}
    p = json.loads((parent_dir / "results.json").read_text())
    before = {"accuracy": p["clean_accuracy"], "asr": p["asr"][0] if p.get("asr") else None}
    if cell.family == "model-detector":
        return {**before, "flagged": res["flagged"], "backdoored": res["backdoored"],
                "right_target": res["right_target"], "statistic": res["statistic"],
                "statistic_name": res["statistic_name"], "detect_seconds": res["cost"]["seconds"],
                "image_passes": res["cost"]["image_passes"],
                "detail": _flagged_text(res["flagged"])}
    if cell.family == "input-detector":
        per_set = (res.get("details") or {}).get("per_set") or {}
        return {**before, "detection_rate": res["detection_rate"], "far_measured": res["far_measured"],
                "far_requested": res["far_requested"], "auroc": res["auroc"],
                "threshold": res["threshold"], "n_clean": res["n_clean"], "n_poisoned": res["n_poisoned"],
                "detection_per_set": {k: v["detection_rate"] for k, v in per_set.items()},
                "detect_seconds": res["cost"]["seconds"], "image_passes": res["cost"]["image_passes"],
                "detail": _input_detect_text(res)}
    if cell.family == "data-inspector":
        return {**before, "precision": res["precision"], "recall": res["recall"],
                "n_flagged": res["n_flagged"], "n": res["n"], "n_poisoned": res["n_poisoned"],
                "inspect_seconds": res["cost"]["seconds"], "image_passes": res["cost"]["image_passes"],
                "detail": _inspect_text(res)}
    if not res:  # the scan flagged no label: nothing to repair with, the model is left as it is
        return {**before, "detail": "no label flagged: model unchanged", "der": None}
    after = res["after"]
    sets = after["sets"]
    detail = res.get("summary") or ""
    g = res.get("goodnet")
    if g and g["sets"]:
        detail += f"; {'GoodNet' if res['method'] != 'nc-filter' else 'filter'} detects " \
                  f"{100 * g['sets'][0]['detection_rate']:.1f} %"
    return {"accuracy": after["clean_accuracy"], "asr": sets[0]["asr"] if sets else None,
            "asr_per_trigger": [x["asr"] for x in sets],
            "robust_accuracy": sets[0]["robust_accuracy"] if sets else None,
            "der": res.get("der"), "detail": detail.strip("; "),
            "repair_seconds": res["cost"]["seconds"], "image_passes": res["cost"]["image_passes"]}


def _given_model(cell: Cell, out: Path, log) -> None:
    """Take over a handed-over model: native copy (defenses need no --arch), clean accuracy, and one
    ASR per poisoned set (label convention as in `backdoorlab.poisoned`)."""
    from backdoorlab.data import load_dataset
    from backdoorlab.evaluation import accuracy, check_compatible
    from backdoorlab.io import atomic_dir, write_json
    from backdoorlab.models.files import load_model, save_model
    from backdoorlab.poisoned import poisoned_sets

    g = cell.spec
    clf = load_model(g["model"], arch=g.get("arch"), input_scale=g.get("input_scale"))
    valid, test = load_dataset(g["valid"], split="train"), load_dataset(g["test"], split="test")
    for what, ds in (("valid", valid), ("test", test)):
        check_compatible(clf, ds, what)
    pois = [load_dataset(p, split="test") for p in as_list(g.get("poisoned"))]
    for ds in pois:
        check_compatible(clf, ds, "poisoned")
    labels = g.get("poisoned_labels", "auto")
    sets = poisoned_sets(pois, as_list(g.get("target")) or None, labels, num_classes=clf.num_classes)
    asr = [ps.success_rate(clf) for ps in sets]
    acc = accuracy(clf, test)
    with atomic_dir(out) as tmp:
        save_model(clf, tmp / "model.safetensors")
        files = {"model": "model.safetensors", "clean_valid": str(Path(g["valid"]).resolve()),
                 "clean_test": str(Path(g["test"]).resolve()),
                 "poisoned_test": [str(Path(p).resolve()) for p in as_list(g.get("poisoned"))],
                 "poisoned_valid": [str(Path(p).resolve()) for p in as_list(g.get("poisoned_valid"))],
                 **({"train": str(Path(g["train"]).resolve())} if g.get("train") else {})}
        write_json(tmp / "results.json", {"kind": "given", "model": g["model"], "clean_accuracy": acc,
                                          "asr": asr, "files": files, "target": g.get("target"),
                                          "poisoned_labels": labels,
                                          "poisoned_sets": [ps.describe() for ps in sets],
                                          "settings": {"plan": {"triggers": [ps.name for ps in sets]}}})
    print(f"given model {g['model']}: clean test accuracy {acc:.2%}"
          + "".join(f", ASR {a:.2%} on {ps.name} ({ps.rule})" for a, ps in zip(asr, sets, strict=True)),
          file=log)


def cell_dir(root: Path, cell: Cell) -> Path:
    return root / "cells" / cell.dirname


def finished(root: Path, cell: Cell) -> dict | None:
    """The stored record of a finished cell with this key, or None."""
    f = cell_dir(root, cell) / "cell.json"
    if not f.is_file():
        # the same key under another label (an attack or defense renamed): reuse it
        hits = sorted((root / "cells").glob(f"*-{cell.key[:12]}/cell.json"))
        if not hits:
            return None
        f = hits[0]
    try:
        rec = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if rec.get("key") == cell.key else None


def status_path(root: Path, cell: Cell) -> Path:
    """The file a running cell keeps its progress in (`backdoorlab.progress`), read by `run`."""
    return root / "logs" / f"{cell.dirname}.status"


def _compute_cell(cell: Cell, d: Path, model_dir: Path | None, scan_dir: Path | None, compute: list[str],
                  rootp: Path) -> None:
    """Run the cell's command, its output captured in logs/<dirname>.log."""
    with open(rootp / "logs" / f"{cell.dirname}.log", "w", encoding="utf-8") as log:
        if cell.kind == "attack":
            _run_cli([*attack_args(cell), "--out", str(d), *compute], log)
        elif cell.kind == "given":
            _given_model(cell, d, log)
        else:
            assert model_dir is not None
            pres = json.loads((model_dir / "results.json").read_text())
            if cell.kind == "scan":
                _run_cli([*scan_args(cell, model_dir, d, pres), *compute], log)
            elif cell.family != "repair":
                _run_cli([*defense_args(cell, model_dir, d, pres), *compute], log)
            else:
                from backdoorlab.defenses.neural_cleanse import scan_repair_labels

                args = repair_args(cell, model_dir, d, pres, scan_dir)
                flagged = (scan_repair_labels(json.loads((scan_dir / "results.json").read_text()))
                           if scan_dir else None)
                if flagged == []:
                    print("Neural Cleanse flagged no label: no reversed trigger to repair with; model "
                          "unchanged", file=log)
                    d.mkdir(parents=True, exist_ok=True)
                else:
                    _run_cli([",".join(map(str, flagged or [])) if a == "{flagged}" else a for a in args]
                             + compute, log)


def run_cell(cell_dict: dict, root: str, parent_dirname: str | None, threads: int) -> dict:
    """Compute one cell (in a worker process or a Ray task); returns its cell.json record."""
    import torch

    from backdoorlab.io import write_json

    torch.set_num_threads(max(1, threads))
    cell = Cell(**cell_dict)
    rootp = Path(root)
    d = cell_dir(rootp, cell)
    parent_dir = rootp / "cells" / parent_dirname if parent_dirname else None
    (rootp / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stale = d / "cell.json"
    if d.exists() and not stale.exists() and cell.kind != "scan":  # an interrupted earlier attempt
        shutil.rmtree(d)  # (a scan resumes in place from its saved state)
    model_dir, scan_dir = parent_dir, None
    if parent_dir is not None and (parent_dir / "cell.json").is_file():
        prec = json.loads((parent_dir / "cell.json").read_text())
        if prec["cell"]["kind"] == "scan":  # the model is the scan's parent
            model_dir, scan_dir = rootp / "cells" / prec["parent_dir"], parent_dir
    compute = _flags(cell.spec.get("compute", {}))  # --device / --precision of [compute]
    from backdoorlab.progress import STATUS_ENV

    status = status_path(rootp, cell)  # where the cell's loops report their progress, for `run`
    os.environ[STATUS_ENV] = str(status)
    try:
        _compute_cell(cell, d, model_dir, scan_dir, compute, rootp)
    finally:
        os.environ.pop(STATUS_ENV, None)
        status.unlink(missing_ok=True)
    rec = {"key": cell.key, "cell": cell.to_dict(), "dir": cell.dirname, "parent_dir": parent_dirname,
           "seconds": round(time.perf_counter() - t0, 2), "threads": threads,
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **_summary(cell, d, model_dir)}
    write_json(d / "cell.json", rec)
    return rec
