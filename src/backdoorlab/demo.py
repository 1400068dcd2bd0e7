"""`backdoorlab demo`: the whole story on the embedded digits, offline, in a few minutes.

1. data: scikit-learn's bundled digits, upscaled to 32×32 RGB, split (seeded) into training,
   clean validation (the defender's data) and test sets;
2. attacks: a clean reference model, BadNets (4×4 white patch → label 0, 10 % poisoned) and
   FTrojan (chroma DCT trigger → label 0, 10 %), each a small CNN;
3. defenses: Neural Cleanse on the clean and BadNets models (the clean one should raise no flag);
   on each backdoored model the pruning sweep with GoodNets and Fine-Pruning; and guided pruning
   of the BadNets model with the trigger Neural Cleanse reverse-engineered for the flagged label;
4. report: ``report.html`` (self-contained), ``report.md`` and ``results.json`` in the output
   folder, plus every run's own folder (models, h5 data, tables, plots).

Each step goes through the same code as the corresponding CLI command.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from backdoorlab.attacks.runner import AttackPlan, train_attack, write_attack_outputs
from backdoorlab.data.digits import load_digits
from backdoorlab.errors import BadInput
from backdoorlab.io import write_json
from backdoorlab.train import TrainConfig

ATTACKS = {
    "clean": AttackPlan(),
    "badnets": AttackPlan(triggers=["patch:size=4"], targets=[0], rate=0.10),
    "ftrojan": AttackPlan(triggers=["ftrojan:preset=gtsrb"], targets=[0], rate=0.10),
}


def _run_cli(args: list[str]) -> None:
    from backdoorlab.cli import main

    rc = main(args)
    if rc != 0:
        raise BadInput(f"demo step failed: backdoorlab {' '.join(args)}")


def _load(p: Path) -> dict:
    return json.loads((p / "results.json").read_text())


def run_demo(out: Path | None = None, quick: bool = False, seed: int = 0) -> dict:
    from backdoorlab.report.builder import build_report

    t0 = time.perf_counter()
    out = Path(out or "backdoorlab-demo")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a folder")
    steps = len(ATTACKS) + 2 + 2 * 2 + 1 + 1
    step = iter(range(1, steps + 1))

    def say(msg: str) -> None:
        print(f"[{next(step)}/{steps}] {msg} ({time.perf_counter() - t0:.0f} s)", flush=True)

    data = load_digits(size=32, rgb=True)
    train_data, test = data.split(0.25, seed=seed)
    print(f"data: digits upscaled to 32x32 RGB: {len(train_data)} training (10 % of it held out as "
          f"clean validation) / {len(test)} test images, 10 classes")
    cfg = TrainConfig(epochs=8 if quick else 20, batch_size=64, lr=2e-3, seed=seed)
    summary: dict[str, dict] = {}
    for name, plan in ATTACKS.items():
        say(f"training the {name} model")
        clf, outcome, art = train_attack(train_data, test, "small_cnn", plan, cfg, 0.1, "unit", seed)
        write_attack_outputs(out / f"attack-{name}", clf, outcome, art)
        summary[name] = {"clean_accuracy": outcome.clean_accuracy,
                         "asr": outcome.asr[0] if outcome.asr else None,
                         "psnr": outcome.trigger_quality[0]["psnr_mean"] if outcome.trigger_quality else None}
    nc_steps = "60" if quick else "300"
    for name in ("clean", "badnets"):
        run = out / f"attack-{name}"
        say(f"Neural Cleanse on the {name} model")
        _run_cli(["cleanse", str(run / "model.safetensors"), "--clean", str(run / "clean_valid.h5"),
                  "--mode", "full", "--steps", nc_steps, "--images", "500",
                  "--out", str(out / f"cleanse-{name}")])
    for name in ("badnets", "ftrojan"):
        run = out / f"attack-{name}"
        data_args = ["--valid", str(run / "clean_valid.h5"), "--test", str(run / "clean_test.h5"),
                     "--poisoned", str(run / "poisoned_test.h5")]
        say(f"pruning sweep + GoodNets on the {name} model")
        _run_cli(["prune", str(run / "model.safetensors"), *data_args, "--out", str(out / f"prune-{name}")])
        say(f"Fine-Pruning the {name} model")
        _run_cli(["fine-prune", str(run / "model.safetensors"), *data_args, "--drop", "4", "--epochs",
                  "5" if quick else "10", "--lr", "5e-4", "--out", str(out / f"fine-prune-{name}")])
    flagged = _load(out / "cleanse-badnets")["flagged"]
    if flagged:
        run = out / "attack-badnets"
        say(f"guided pruning of the badnets model with the reversed trigger of label {flagged[0]}")
        _run_cli(["prune", str(run / "model.safetensors"), "--valid", str(run / "clean_valid.h5"),
                  "--test", str(run / "clean_test.h5"), "--poisoned", str(run / "poisoned_test.h5"),
                  "--order", "guided", "--guide-triggers", str(out / "cleanse-badnets" / "triggers.npz"),
                  "--guide-labels", str(flagged[0]), "--out", str(out / "guided-prune-badnets")])
    else:
        say("guided pruning skipped: Neural Cleanse flagged no label on the badnets model")
    # summary table
    head = ["model", "clean acc", "ASR", "Neural Cleanse flags", "pruned (4-pt drop): acc / ASR",
            "GoodNet detection", "fine-pruned: acc / ASR", "guided by NC trigger (4-pt drop): acc / ASR"]
    rows = []
    for name in ATTACKS:
        s = summary[name]
        row = [name, _pct(s["clean_accuracy"]), _pct(s["asr"])]
        if (out / f"cleanse-{name}").exists():
            row.append(", ".join(map(str, _load(out / f"cleanse-{name}")["flagged"])) or "none")
        else:
            row.append("—")
        row += _prune_cells(out / f"prune-{name}", goodnet=True)
        if (out / f"fine-prune-{name}").exists():
            fp = _load(out / f"fine-prune-{name}")["after_finetuning"]
            row.append(f"{_pct(fp['test_accuracy'])} / {_pct(fp['asr'])}")
        else:
            row.append("—")
        row += _prune_cells(out / f"guided-prune-{name}", goodnet=False)
        rows.append(row)
    seconds = time.perf_counter() - t0
    say("writing the report")
    results = {
        "kind": "demo", "seed": seed, "quick": quick, "seconds": round(seconds, 1),
        "summary": (f"Digits (32×32 RGB), small CNN, {cfg.epochs} epochs per model; backdoors target "
                    f"label 0. Whole demo: {seconds:.0f} s on this machine. Accuracy on the clean test set, "
                    "ASR on test images of other labels carrying the trigger. Drops are in percentage "
                    "points of clean validation accuracy." + _notes(summary)),
        "table": {"head": head, "rows": rows}, "models": summary,
    }
    write_json(out / "results.json", results)
    md, hp = build_report(out, "backdoorlab demo: attack, detect, repair")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print()
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    print(f"\nreport: {hp.resolve()}  (also {md.name}, results.json; runs in {out}/)")
    return results


def _prune_cells(d: Path, goodnet: bool) -> list[str]:
    if not d.exists():
        return ["—", "—"] if goodnet else ["—"]
    th = {t["drop"]: t for t in _load(d)["sweep"]["thresholds"]}.get(4.0, {})
    cells = [f"{_pct(th.get('test_accuracy'))} / {_pct(th.get('asr'))}"]
    if goodnet:
        cells.append(_pct((th.get("goodnet") or {}).get("detection_rate")))
    return cells


def _notes(summary: dict) -> str:
    notes = []
    for name, s in summary.items():
        if s["asr"] is not None and s["asr"] < 0.5:
            notes.append(f" The {name} backdoor was not learned here (ASR {_pct(s['asr'])}): its trigger is "
                         "too faint for this small model and data set, so the defenses have nothing to "
                         "remove; see docs/ for GTSRB.")
    return "".join(notes)


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"
