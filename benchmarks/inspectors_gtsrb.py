"""The data-inspector benchmark: Spectral Signatures and Activation Clustering on poisoned GTSRB
training sets → docs/inspectors-gtsrb.md.

Runs `backdoorlab run benchmarks/inspectors_gtsrb.toml` (cached and resumable): each attack cell
trains gtsrb_cnn on its poisoned training set and writes that set with its poisoned rows recorded
(the grid holds data inspectors), each inspector cell runs `backdoorlab inspect` on it with the
attack model's features. The table gives, per attack × inspector: the model's clean accuracy and
ASR (official test set), the poisoned rows and their share of the target class (the setting the
methods assume small), the samples flagged, precision and recall of the poisoned rows, the samples
flagged inside the target class and the precision there (both methods judge each class on its
own; spectral removes 1.5 ε of every class, so its whole-set precision is low by design), time.
Nothing is chosen from these figures: every inspector runs at its paper's defaults
(spectral at both of the paper's ε).

    nice python benchmarks/inspectors_gtsrb.py [--seeds 0] [--threads 1] [--no-run]

The figures of every finished cell are also kept in ``benchmarks/results/inspectors-gtsrb.json``
(committed; the run folder holds the training sets and does not outlive a fresh clone).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from doc_section import replace_section
from grid_bench import drop_stale, finished_cells, ms, options, planned_keys, run_grid

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "inspectors-gtsrb.json"
BEGIN, END = "<!-- inspectors-gtsrb:begin -->", "<!-- inspectors-gtsrb:end -->"


def collect(out: Path, keys: dict[str, str]) -> dict:
    """``attack/defense/seed`` → the figures of each finished inspector cell (with its model's) that
    the grid plans now (`grid_bench.finished_cells`)."""
    attacks, rec = {}, {}
    cells = finished_cells(out, keys)
    for cell, res in cells:
        if cell["kind"] == "attack":
            attacks[(cell["attack"], cell["seed"])] = res
    for cell, res in cells:
        if res.get("kind") != "inspect":
            continue
        a = attacks.get((cell["attack"], cell["seed"]))
        if a is None:
            continue
        targets = (a.get("settings") or {}).get("plan", {}).get("targets") or []
        t = targets[0] if targets else None
        per_t = (res.get("per_class") or {}).get(str(t), {}) if t is not None else {}
        size = per_t.get("n")
        t_flagged = per_t.get("flagged", per_t.get("removed"))  # AC says flagged, spectral removed
        hits = None if res["recall"] is None else round(res["recall"] * res["n_poisoned"])
        rec[f"{cell['attack']}/{cell['defense']}/{cell['seed']}"] = {
            "clean_accuracy": a["clean_accuracy"], "asr": (a.get("asr") or [None])[0], "target": t,
            "target_class_size": size, "n": res["n"], "n_poisoned": res["n_poisoned"],
            "n_flagged": res["n_flagged"], "precision": res["precision"], "recall": res["recall"],
            "target_flagged": t_flagged,
            "target_precision": hits / t_flagged if hits is not None and t_flagged else None,
            "options": res["options"], "seconds": res["cost"]["seconds"],
            "image_passes": res["cost"]["image_passes"], "key": cell["key"]}
    return rec


def remember(new: dict, keys: dict[str, str], path: Path = RECORD) -> dict:
    """Merge ``new`` into the record at ``path`` (this run's cells win; entries whose cache key is no
    longer the grid's are dropped, `grid_bench.drop_stale`); return the merged record."""
    rec = json.loads(path.read_text()) if path.is_file() else {}
    for k in drop_stale(rec, keys, lambda k: "{}-{}-s{}".format(*k.split("/"))):
        print(f"record: dropped {k} (its cell's cache key changed)")
    rec.update(new)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    return rec


def table(rec: dict, order: list[str]) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for k, v in rec.items():
        attack, defense, _ = k.rsplit("/", 2)
        groups.setdefault((attack, defense), []).append(v)
    head = ("| attack | inspector | seeds | clean acc (%) | ASR (%) | poisoned rows | share of the target "
            "class (%) | flagged | precision (%) | recall (%) | flagged in the target class | precision "
            "there (%) | s |")
    lines = [head, "|" + "---|" * 13]
    def place(item: tuple) -> tuple:
        (attack, defense), _ = item
        return order.index(attack) if attack in order else len(order), defense

    for (attack, defense), vs in sorted(groups.items(), key=place):
        share = [v["n_poisoned"] / v["target_class_size"] for v in vs
                 if v["n_poisoned"] and v.get("target_class_size")]
        lines.append(
            f"| {attack} | {defense} | {len(vs)} | {ms([v['clean_accuracy'] for v in vs])} | "
            f"{ms([v['asr'] for v in vs])} | {ms([v['n_poisoned'] for v in vs], 1.0, 0)} | "
            f"{ms(share)} | {ms([v['n_flagged'] for v in vs], 1.0, 0)} | "
            f"{ms([v['precision'] for v in vs])} | {ms([v['recall'] for v in vs])} | "
            f"{ms([v.get('target_flagged') for v in vs], 1.0, 0)} | "
            f"{ms([v.get('target_precision') for v in vs])} | {ms([v['seconds'] for v in vs], 1.0, 0)} |")
    return "\n".join(lines)


def main() -> None:
    args = options(__doc__.splitlines()[0], "inspectors-gtsrb")
    out, config = Path(args.out), Path(args.config)
    code = 0
    if not args.no_run:
        code = run_grid(config, out, args.jobs, args.seeds, args.threads, args.attacks)
    keys = planned_keys(config)
    rec = remember(collect(out, keys) if out.is_dir() else {}, keys)
    order = re.findall(r'(?m)^name = "([^"]+)"$', config.read_text().split("[[attack]]", 1)[-1])
    body = "\n".join([BEGIN, "", table(rec, order), "", END])
    print(body)
    replace_section(Path(args.doc), body, BEGIN, END)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
