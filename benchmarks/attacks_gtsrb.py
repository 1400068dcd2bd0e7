"""The attack benchmark: every attack on GTSRB, 3 seeds → docs/attacks-gtsrb.md.

Runs `backdoorlab run benchmarks/attacks_gtsrb.toml` (cached and resumable: an interrupted or
extended run only trains the models it lacks), then reads every attack cell of the run folder and
writes one table: per attack, the clean test accuracy and its change against the clean model of
the same seed, the ASR on the official test set (images of other labels carrying the test-time
trigger), PSNR and SSIM of those poisoned test images against their clean originals, and the
training time (mean ± sample sd over the seeds on record). An attack "meets the goal" of the
attacks issue on a seed when its ASR is ≥ 90 % at ≤ 1 point of clean accuracy below the clean
model.

    nice python benchmarks/attacks_gtsrb.py [--seeds 0] [--out runs/attacks-gtsrb] [--no-run]

Another grid file of the same form (``--config benchmarks/attacks_gtsrb_budget.toml``: the attacks
that miss the goal, trained longer) gets its own run folder, record and table, all named after the
file (runs/attacks-gtsrb-budget, benchmarks/results/attacks-gtsrb-budget.json, the
``attacks-gtsrb-budget`` section of the same page).

Every finished cell is also kept, compact, in ``benchmarks/results/attacks-gtsrb.json`` (committed),
so a seed computed in one session still counts after the run folder (gigabytes of models) is gone.
A cell computed again replaces its record. The table is always over every seed on record.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from doc_section import replace_section
from grid_bench import drop_stale, finished_cells, ms, options, planned_keys, run_grid

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- attacks-gtsrb:begin -->", "<!-- attacks-gtsrb:end -->"
RECORD = ROOT / "benchmarks" / "results" / "attacks-gtsrb.json"
GOAL_ASR, GOAL_DROP = 0.90, 0.01


def compact(res: dict) -> dict:
    """The figures of one attack cell that the table needs."""
    q = (res.get("trigger_quality") or [{}])[0]
    p = res.get("poison") or {}
    plan = res.get("settings", {}).get("plan", {})
    return {"clean_accuracy": res["clean_accuracy"], "asr": (res.get("asr") or [None])[0],
            "psnr": q.get("psnr_mean"), "ssim": q.get("ssim_mean"),
            "train_seconds": res.get("train_seconds"), "epochs": res.get("epochs"),
            "trigger": plan.get("triggers"), "rate": p.get("rate"), "poisoned": p.get("count"),
            "cover": p.get("cover_count"), "clean_label": p.get("clean_label")}


def collect(out: Path, keys: dict[str, str]) -> dict:
    """attack → seed → compact figures, from the attack cells of a run folder that the grid plans
    now (`grid_bench.finished_cells`)."""
    found: dict = defaultdict(dict)
    for cell, res in finished_cells(out, keys):
        if cell["kind"] == "attack":
            found[cell["attack"]][int(cell["seed"])] = {**compact(res), "key": cell["key"]}
    return found


def remember(found: dict, keys: dict[str, str], path: Path = RECORD) -> dict:
    """Merge ``found`` into the record at ``path`` (this run's cells win; entries whose cache key is
    no longer the grid's are dropped, `grid_bench.drop_stale`); return the merged record."""
    rec = json.loads(path.read_text()) if path.is_file() else {}
    for k in drop_stale(rec, keys, lambda k: "{}-s{}".format(*k.rsplit("/", 1))):
        print(f"record: dropped {k} (its cell's cache key changed)")
    for attack, by_seed in found.items():
        for seed, fig in by_seed.items():
            rec[f"{attack}/{seed}"] = fig
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    merged: dict = defaultdict(dict)
    for key, fig in rec.items():
        attack, seed = key.rsplit("/", 1)
        merged[attack][int(seed)] = fig
    return merged


def table(rec: dict, order: list[str]) -> str:
    clean = rec.get("clean", {})
    lines = ["| attack | trigger | rate | seeds | clean acc (%) | Δ vs clean (pts) | ASR (%) | PSNR (dB) | "
             "SSIM | train s | goal met |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for attack in order + sorted(set(rec) - set(order)):
        seeds = rec.get(attack)
        if not seeds:
            continue
        figs = [seeds[s] for s in sorted(seeds)]
        deltas = [seeds[s]["clean_accuracy"] - clean[s]["clean_accuracy"]
                  for s in sorted(seeds) if s in clean]
        if attack == "clean":
            met = "—"
        else:
            ok = sum(1 for s in sorted(seeds) if s in clean and (seeds[s]["asr"] or 0) >= GOAL_ASR
                     and clean[s]["clean_accuracy"] - seeds[s]["clean_accuracy"] <= GOAL_DROP)
            met = f"{ok}/{sum(1 for s in seeds if s in clean)}"
        f0 = figs[0]
        trig = f0.get("trigger") or []
        trig = ", ".join(f"`{s}`" for s in ([trig] if isinstance(trig, str) else trig)) or "none"
        rate = "—" if f0.get("rate") is None else (
            f"{100 * f0['rate']:g} %" + (" clean-label" if f0.get("clean_label") else "")
            + (f" + {f0['cover']:,} cover" if f0.get("cover") else ""))
        lines.append(
            f"| {attack} | {trig} | {rate} | {len(figs)} | {ms([f['clean_accuracy'] for f in figs])} | "
            f"{ms(deltas, 100.0, 2, sign=True) if attack != 'clean' else '—'} | "
            f"{ms([f['asr'] for f in figs])} | "
            f"{ms([f['psnr'] for f in figs], 1.0, 1)} | {ms([f['ssim'] for f in figs], 1.0, 3)} | "
            f"{ms([f['train_seconds'] for f in figs], 1.0, 0)} | {met} |")
    return "\n".join(lines)


def attack_order(config: Path) -> list[str]:
    return re.findall(r'(?m)^name = "([^"]+)"$', config.read_text().split("[[attack]]", 1)[-1])


def main() -> None:
    args = options(__doc__.splitlines()[0], "attacks-gtsrb")
    config = Path(args.config)
    name = config.stem.replace("_", "-")  # attacks-gtsrb, or another grid file's own name
    out = Path(args.out) if name == "attacks-gtsrb" or "--out" in sys.argv else ROOT / "runs" / name
    record = RECORD.with_name(f"{name}.json")
    begin, end = BEGIN.replace("attacks-gtsrb", name), END.replace("attacks-gtsrb", name)
    keys = planned_keys(config)
    if not args.no_run:
        code = run_grid(config, out, args.jobs, args.seeds, args.threads, args.attacks)
        if out.is_dir():  # keep what finished even when the run stopped early
            remember(collect(out, keys), keys, record)
        if code:
            raise SystemExit(code)
    rec = remember(collect(out, keys) if out.is_dir() else {}, keys, record)
    body = "\n".join([begin, "", table(rec, attack_order(config)), "", end])
    print(body)
    replace_section(Path(args.doc), body, begin, end)


if __name__ == "__main__":
    main()
