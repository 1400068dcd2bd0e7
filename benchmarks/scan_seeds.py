"""How much does `scan`'s verdict depend on the detectors' seed? (docs/detection.md)

A detector's seed draws its random starts (MM-BD's starting images; Neural Cleanse's starting masks
and patterns and its order of images), so one model can get different p-values from two runs
that differ in nothing a user chose. This script runs `backdoorlab scan`'s default set (mm-bd and
neural-cleanse at their defaults, `verdict`'s Bonferroni rule) on the models of the zoo's digits
files at several detector seeds and counts the models whose verdict or suspected target changes
with the seed. Each (model, seed) is written to the record as it finishes, so the run resumes; a
run recorded with an earlier revision of a detector (`registry`'s ``revision``) has that detector
run again, the other kept.

    nice python benchmarks/scan_seeds.py [--seeds 0,1,2] [--settings digits-small,...] [--only RE]
                                        [--record benchmarks/results/scan-seeds.json] [--no-run]

Needs the zoo's runs (``benchmarks/zoo.py``) in this workspace; ``--no-run`` only tabulates the
record.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from grid_bench import planned_keys

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = "digits-small,digits-short,digits-input-aware"
IMPLANTED = 0.5  # test ASR from which a model counts as backdoored (as in zoo.py)


def models(zoo: Path, setting: str) -> list[dict]:
    """The attack model cells of one zoo file, as the file plans them now."""
    out = []
    for label, key in planned_keys(ROOT / "benchmarks" / "zoo" / f"{setting}.toml").items():
        cell = zoo / setting / "cells" / f"{label}-{key[:12]}"
        if not (cell / "model.safetensors").exists():
            continue
        res = json.loads((cell / "results.json").read_text())
        spec = json.loads((cell / "cell.json").read_text())["cell"]
        targets = spec["spec"].get("attack", {}).get("target") if spec["attack"] != "clean" else None
        asr = res["asr"][0] if res.get("asr") else None
        out.append({"setting": setting, "model": label, "attack": spec["attack"], "dir": str(cell),
                    "targets": targets, "asr": asr,
                    "backdoored": asr is not None and asr >= IMPLANTED})
    return out


DETECTORS = ("mm-bd", "neural-cleanse")


def revisions() -> dict[str, int]:
    """The registry revision of each detector of the scan (bumped when what it computes changes)."""
    from backdoorlab import registry

    return {n: registry.get(n).revision for n in DETECTORS}


def stale(run: dict) -> list[str]:
    """The detectors of a recorded run computed by an earlier revision of their code (a run recorded
    before revisions were kept counts as revision 0)."""
    have = run.get("revisions", {})
    return [n for n, r in revisions().items() if have.get(n, 0) != r]


def scan_once(model: dict, seed: int, previous: dict | None = None) -> dict:
    """`scan`'s default set at detector seed ``seed``; with ``previous`` (a recorded run), only the
    detectors whose revision changed since are run again and the others' figures are kept."""
    from backdoorlab.data import load_dataset
    from backdoorlab.detectors import Detection, detect, verdict
    from backdoorlab.models import load_model

    clf = load_model(Path(model["dir"]) / "model.safetensors")
    clean = load_dataset(str(Path(model["dir"]) / "clean_valid.h5"))
    redo = stale(previous) if previous else list(DETECTORS)
    results = {name: detect(name, clf, clean, {"seed": seed}) for name in redo}
    p = {n: r.detection.p_value for n, r in results.items()}
    flagged = {n: r.detection.flagged for n, r in results.items()}
    for n in DETECTORS:
        if n not in results:  # kept from the record: enough of a result for `verdict`
            p[n], flagged[n] = previous["p"][n], previous["flagged"][n]
            results[n] = Detection.recorded(flagged[n], bool(flagged[n]), p[n])
    v = verdict({n: results[n] for n in DETECTORS})
    return {"backdoored": v.backdoored, "targets": v.targets, "p": p, "flagged": flagged,
            "revisions": revisions()}


def merged_verdict(m: dict, seeds: list[int], alpha: float = 0.05) -> tuple[bool, list[int]]:
    """`scan --repeats`'s verdict from the record: each detector's p-values over ``seeds`` merged
    (`merged_p_value`), flags = labels at least k runs flag, Bonferroni over the detectors."""
    import math
    from collections import Counter

    from backdoorlab.detectors import merged_p_value

    runs = [m["runs"][str(s)] for s in seeds]
    k = math.ceil(len(seeds) / 2)
    names = list(runs[0]["p"])
    level = alpha / len(names)
    votes: Counter[int] = Counter()
    significant = False
    for name in names:
        if merged_p_value([r["p"][name] for r in runs]) < level:
            significant = True
            counts = Counter(y for r in runs for y in r["flagged"][name])
            votes.update([y for y, c in counts.items() if c >= k])
    return significant, [y for y, _ in votes.most_common()]


def table(record: dict, seeds: list[int]) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for m in record.values():
        if all(str(s) in m["runs"] for s in seeds):
            groups.setdefault((m["setting"], m["attack"]), []).append(m)
    lines = [f"Detector seeds {', '.join(map(str, seeds))}; one verdict per seed (`scan`'s default set "
             "and rule).", "",
             "| setting | attack | models | verdict the same at every seed | backdoored at k of "
             f"{len(seeds)} seeds (models) | right target at every seed | merged over the seeds "
             "(`--repeats`): backdoored | right target | NC p-value spread (median max/min) | MM-BD "
             "p-value spread (median max/min) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (setting, attack), ms in sorted(groups.items()):
        same = sum(len({m["runs"][str(s)]["backdoored"] for s in seeds}) == 1 for m in ms)
        counts: dict[int, int] = {}
        for m in ms:
            k = sum(m["runs"][str(s)]["backdoored"] for s in seeds)
            counts[k] = counts.get(k, 0) + 1
        dist = ", ".join(f"{k}: {counts[k]}" for k in sorted(counts, reverse=True))
        merged = [merged_verdict(m, seeds) for m in ms]
        flagged_m = f"{sum(b for b, _ in merged)}/{len(ms)}"
        if ms[0]["targets"] and len(ms[0]["targets"]) == 1:
            right = sum(all(m["runs"][str(s)]["backdoored"]
                            and m["runs"][str(s)]["targets"][:1] == m["targets"] for s in seeds)
                        for m in ms)
            right_s = f"{right}/{len(ms)}"
            hits = sum(b and t[:1] == m["targets"] for (b, t), m in zip(merged, ms, strict=True))
            right_m = f"{hits}/{len(ms)}"
        else:
            right_s = right_m = "—"

        def spread(name: str, ms=ms) -> str:
            r = [max(ps) / max(min(ps), 1e-300) for m in ms
                 for ps in [[m["runs"][str(s)]["p"][name] for s in seeds]]]
            return f"{statistics.median(r):.3g}"

        note = " (not implanted)" if ms[0]["targets"] and not any(m["backdoored"] for m in ms) else ""
        lines.append(f"| {setting} | {attack}{note} | {len(ms)} | {same}/{len(ms)} | {dist} | {right_s} | "
                     f"{flagged_m} | {right_m} | {spread('neural-cleanse')} | {spread('mm-bd')} |")
    return lines


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=str(ROOT / "runs" / "zoo"))
    ap.add_argument("--settings", default=SETTINGS)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", default=str(ROOT / "benchmarks" / "results" / "scan-seeds.json"))
    ap.add_argument("--only", default="", help="regular expression on the model's cell label "
                    "(e.g. 'clean|badnets-s')")
    ap.add_argument("--no-run", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    path = Path(a.record)
    record = json.loads(path.read_text()) if path.exists() else {}
    if not a.no_run:
        todo = [m for s in a.settings.split(",") for m in models(Path(a.zoo), s)
                if not a.only or re.search(a.only, m["model"])]
        for i, m in enumerate(todo):
            key = f"{m['setting']}/{m['model']}"
            entry = record.setdefault(key, {**{k: v for k, v in m.items() if k != "dir"}, "runs": {}})
            for s in seeds:
                prev = entry["runs"].get(str(s))
                if prev is not None and not stale(prev):
                    continue
                entry["runs"][str(s)] = scan_once(m, s, prev)
                path.write_text(json.dumps(record, indent=1) + "\n")
                r = entry["runs"][str(s)]
                print(f"[{i + 1}/{len(todo)}] {key} seed {s}: backdoored {r['backdoored']} {r['targets']} "
                      f"p {r['p']}", flush=True)
    print("\n".join(table(record, seeds)))


if __name__ == "__main__":
    main()
