"""The experiment's summary table: clean accuracy and ASR before and after each defense, over seeds.

Each row is one attack × defense (the row "none" is the attack model itself). Figures are the
mean ± sample standard deviation (n − 1) over the seeds that finished, in percent: clean
accuracy on the clean test set, ASR on the poisoned test set (inputs whose true label is the
target excluded, or every input when the file's labels are the attack target). Δ acc is the change
in clean test accuracy in percentage points; robust accuracy the share of poisoned inputs classified
as their true label (— for files without true labels); DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2
(BackdoorBench; 1 = backdoor removed at no accuracy cost, 0.5 = no change); repair seconds and image
passes are the repair's own cost (`backdoorlab.cost`), not the measuring. An attack whose ASR
before is below 50 % is marked "did not implant" in its rows. For an attack with several
triggers (or a given model with several poisoned sets) the ASR columns are those of the first set,
and the notes of every row give the ASR of each set.
"""

from __future__ import annotations

import math

from backdoorlab.experiment.cells import DETECTOR_FAMILIES, Cell

HEAD = ["attack", "defense", "seeds", "clean acc before", "ASR before", "clean acc after", "ASR after",
        "Δ acc (pts)", "robust acc after", "DER", "repair s", "image passes", "notes"]
IMPLANTED = 0.5  # an attack whose ASR stays below this "did not implant"; its defense rows say so
def mean_std(values: list[float | None]) -> tuple[float, float, int] | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s, len(v)


def fmt(ms: tuple[float, float, int] | None, scale: float = 100.0, digits: int = 2) -> str:
    if ms is None:
        return "—"
    m, s, n = ms
    return f"{scale * m:.{digits}f}" + (f" ± {scale * s:.{digits}f}" if n > 1 else "")


def _per_trigger_note(recs: list[dict | None], parents: list[dict | None]) -> str:
    """"ASR per trigger: name a; name b" (means over seeds) for records with several poisoned
    sets; "" for one. ``parents`` (the attack records) name the triggers."""
    per = [r.get("asr_per_trigger") or [] for r in recs if r]
    if not per or max(len(a) for a in per) < 2:
        return ""
    k = max(len(a) for a in per)
    names = next((p.get("triggers") for p in parents if p and len(p.get("triggers") or []) == k), None)
    names = names or [f"trigger {i + 1}" for i in range(k)]
    each = [f"{names[i]} {fmt(mean_std([a[i] if len(a) > i else None for a in per]))}" for i in range(k)]
    return "ASR per trigger: " + "; ".join(each)


def model_record(c: Cell, by_key: dict[str, Cell], records: dict[str, dict]) -> dict | None:
    """The record of the model a defense cell starts from (through a shared Neural Cleanse scan)."""
    while c.parent is not None:
        c = by_key[c.parent]
        if c.kind != "scan":
            break
    return records.get(c.key)


def summary_rows(cells: list[Cell], records: dict[str, dict]) -> list[list[str]]:
    """Rows in grid order; cells without a record (failed) are left out of the means."""
    by_key = {c.key: c for c in cells}
    # scans only feed repairs (no row of their own); detectors have their tables (`detection_rows`,
    # `input_detection_rows`)
    cells = [c for c in cells if c.kind != "scan" and c.family not in DETECTOR_FAMILIES]
    order: list[tuple[str, str | None]] = []
    for c in cells:
        if (c.attack, c.defense) not in order:
            order.append((c.attack, c.defense))
    rows = []
    blank = [""] * 4
    for attack, defense in order:
        group = [c for c in cells if c.attack == attack and c.defense == defense and c.key in records]
        if not group:
            rows.append([attack, defense or "none", "0", "—", "—", "—", "—", "—", *blank, "failed"])
            continue
        parents = [model_record(c, by_key, records) if c.parent else records[c.key] for c in group]
        before_acc = mean_std([p["accuracy"] if p else None for p in parents])
        before_asr = mean_std([p["asr"] if p else None for p in parents])
        implant = ([f"did not implant (ASR {fmt(before_asr)} % < {100 * IMPLANTED:.0f} %)"]
                   if before_asr is not None and before_asr[0] < IMPLANTED else [])
        if defense is None:
            rows.append([attack, "none", str(len(group)), fmt(before_acc), fmt(before_asr), "", "", "",
                         *blank, "; ".join(implant + ([n] if (n := _per_trigger_note(parents, parents))
                                                      else []))])
            continue
        recs = [records[c.key] for c in group]
        after_acc = mean_std([r["accuracy"] for r in recs])
        after_asr = mean_std([r["asr"] for r in recs])
        delta = mean_std([r["accuracy"] - p["accuracy"] if (p and r["accuracy"] is not None) else None
                          for r, p in zip(recs, parents, strict=True)])
        robust = mean_std([r.get("robust_accuracy") for r in recs])
        der = mean_std([r.get("der") for r in recs])
        secs = mean_std([r.get("repair_seconds") for r in recs])
        passes = mean_std([r.get("image_passes") for r in recs])
        multi = _per_trigger_note(recs, parents)
        if not multi and _per_trigger_note(parents, parents):  # a record from before per-set ASR
            first = next(p.get("triggers") for p in parents if p and p.get("triggers"))[0]
            multi = f"ASR of the first trigger ({first}) only"
        elif multi:
            multi += " (after)"
        notes: list[str] = implant + ([multi] if multi else [])
        for r in recs:
            if r.get("detail") and r["detail"] not in notes:
                notes.append(r["detail"])
        rows.append([attack, defense, str(len(recs)), fmt(before_acc), fmt(before_asr), fmt(after_acc),
                     fmt(after_asr), fmt(delta), fmt(robust), fmt(der, 1.0, 3), fmt(secs, 1.0, 1),
                     "—" if passes is None else f"{passes[0]:,.0f}",
                     "; ".join(notes[:3]) + (" …" if len(notes) > 3 else "")])
    return rows


def heatmap_values(cells: list[Cell], records: dict[str, dict]) -> tuple[list[str], list[str], list, list]:
    """(attacks, repairs, ASR after in %, Δ clean accuracy in points): means over seeds, None where
    no seed finished."""
    by_key = {c.key: c for c in cells}
    reps = [c for c in cells if c.family == "repair"]
    attacks = list(dict.fromkeys(c.attack for c in reps))
    defenses = list(dict.fromkeys(c.defense for c in reps))
    asr, acc = [], []
    for a in attacks:
        ra, rc = [], []
        for d in defenses:
            group = [c for c in reps if c.attack == a and c.defense == d and c.key in records]
            after = mean_std([records[c.key]["asr"] for c in group])
            pairs = [(records[c.key], model_record(c, by_key, records)) for c in group]
            delta = mean_std([r["accuracy"] - m["accuracy"] for r, m in pairs
                              if m and r["accuracy"] is not None])
            ra.append(None if after is None else 100 * after[0])
            rc.append(None if delta is None else 100 * delta[0])
        asr.append(ra)
        acc.append(rc)
    return attacks, defenses, asr, acc


DETECTION_NOTE = ("Per attack × model detector: the seeds whose model it flags as backdoored, the seeds "
                  "whose most suspicious flagged label is the attack's target, its statistic (mean ± std "
                  "over seeds), its time and image passes. On a model whose attack did not implant a "
                  "flag is a false alarm.")
DETECT_HEAD = ["attack", "detector", "seeds", "ASR of the model", "flagged as backdoored", "right target",
               "statistic", "detect s", "image passes", "notes"]


def detection_rows(cells: list[Cell], records: dict[str, dict]) -> list[list[str]]:
    """One row per attack × model detector: the share of seeds whose model it flagged, the share
    whose most suspicious flagged label is the attack's target, its statistic (mean ± std), cost.
    On a clean model (an attack that did not implant) a flag is a false alarm."""
    rows = []
    order: list[tuple[str, str | None]] = []
    dets = [c for c in cells if c.family == "model-detector"]
    for c in dets:
        if (c.attack, c.defense) not in order:
            order.append((c.attack, c.defense))
    for attack, defense in order:
        group = [c for c in dets if c.attack == attack and c.defense == defense]
        recs = [records[c.key] for c in group if c.key in records]
        if not recs:
            rows.append([attack, defense or "", "0", *["—"] * 6, "failed"])
            continue
        asr = mean_std([r.get("asr") for r in recs])
        flagged = sum(bool(r["backdoored"]) for r in recs)
        right = [r["right_target"] for r in recs if r.get("right_target") is not None]
        stat = mean_std([r.get("statistic") for r in recs])
        notes = ["did not implant: a flag is a false alarm"] if asr is not None and asr[0] < IMPLANTED else []
        notes += sorted({r["detail"] for r in recs if r.get("detail")})
        rows.append([attack, defense or "", str(len(recs)), fmt(asr), f"{flagged}/{len(recs)}",
                     f"{sum(right)}/{len(right)}" if right else "—",
                     ("" if stat is None else f"{recs[0].get('statistic_name', '')} ") + fmt(stat, 1.0, 2),
                     fmt(mean_std([r.get("detect_seconds") for r in recs]), 1.0, 1),
                     f"{mean_std([r.get('image_passes') for r in recs])[0]:,.0f}",
                     "; ".join(notes[:3])])
    return rows


INPUT_DETECTION_NOTE = ("Per attack × input detector: fitted, and its threshold set at the false-alarm "
                        "rate the file asks for (FAR requested; default 0.05), on the attack model's "
                        "clean validation split; the share of poisoned test inputs it rejects (detection "
                        "rate), the share of clean test inputs it rejects (FAR measured), in %, and the "
                        "AUROC of its scores, poisoned against clean — mean ± std over seeds; its time "
                        "and image passes. On a model whose attack did not implant a rejected poisoned "
                        "input is no evidence of a backdoor.")
INPUT_DETECT_HEAD = ["attack", "detector", "seeds", "ASR of the model", "FAR requested", "detection rate",
                     "FAR measured", "AUROC", "detect s", "image passes", "notes"]


def family_groups(cells: list[Cell], records: dict[str, dict], family: str):
    """(attack, defense, finished records over the seeds, ASR of the model as mean ± std, notes
    started with "did not implant" where so) per attack × method of ``family``, in grid order."""
    dets = [c for c in cells if c.family == family]
    for attack, defense in dict.fromkeys((c.attack, c.defense) for c in dets):
        recs = [records[c.key] for c in dets if c.attack == attack and c.defense == defense
                and c.key in records]
        asr = mean_std([r.get("asr") for r in recs])
        implanted = asr is None or asr[0] >= IMPLANTED
        yield attack, defense or "", recs, asr, [] if implanted else ["did not implant"]


def _passes(recs: list[dict]) -> str:
    passes = mean_std([r.get("image_passes") for r in recs])
    return "—" if passes is None else f"{passes[0]:,.0f}"


def input_detection_rows(cells: list[Cell], records: dict[str, dict]) -> list[list[str]]:
    """One row per attack × input detector: detection rate, false-alarm rate set and measured, AUROC
    (mean ± std over seeds) and cost; the notes give each trigger's detection rate when the attack
    has several poisoned sets."""
    rows = []
    for attack, defense, recs, asr, notes in family_groups(cells, records, "input-detector"):
        if not recs:
            rows.append([attack, defense, "0", *["—"] * 7, "failed"])
            continue
        if all(r.get("detection_rate") is None for r in recs):
            notes.append("no poisoned test data: detection rate not measured")
        per = [r.get("detection_per_set") or {} for r in recs]
        names = list(dict.fromkeys(k for p in per for k in p))
        if len(names) > 1:
            notes.append("detection per trigger: " + "; ".join(
                f"{n} {fmt(mean_std([p.get(n) for p in per]))}" for n in names))
        rows.append([attack, defense, str(len(recs)), fmt(asr),
                     fmt(mean_std([r.get("far_requested") for r in recs])),
                     fmt(mean_std([r.get("detection_rate") for r in recs])),
                     fmt(mean_std([r.get("far_measured") for r in recs])),
                     fmt(mean_std([r.get("auroc") for r in recs]), 1.0, 3),
                     fmt(mean_std([r.get("detect_seconds") for r in recs]), 1.0, 1),
                     _passes(recs), "; ".join(notes)])
    return rows


INSPECTION_NOTE = ("Per attack × data inspector: run on the training set the attack model was trained on "
                   "(as poisoned before training), with that model's features; the training samples it "
                   "flags, the share of them that are poisoned (precision) and the share of the "
                   "poisoned samples it flags (recall), in %, mean ± std over seeds; its time and image "
                   "passes. A clean model's training set holds no poison: every flag removes a clean "
                   "sample.")
INSPECT_HEAD = ["attack", "inspector", "seeds", "ASR of the model", "poisoned samples", "flagged",
                "precision", "recall", "inspect s", "image passes", "notes"]


def inspection_rows(cells: list[Cell], records: dict[str, dict]) -> list[list[str]]:
    """One row per attack × data inspector: samples flagged, precision and recall against the
    poisoned rows (mean ± std over seeds) and cost."""
    rows = []
    for attack, defense, recs, asr, notes in family_groups(cells, records, "data-inspector"):
        if not recs:
            rows.append([attack, defense, "0", *["—"] * 7, "failed"])
            continue
        if all(r.get("n_poisoned") is None for r in recs):
            notes.append("poisoned rows unknown: precision and recall not measured")
        rows.append([attack, defense, str(len(recs)), fmt(asr),
                     fmt(mean_std([r.get("n_poisoned") for r in recs]), 1.0, 0),
                     fmt(mean_std([r.get("n_flagged") for r in recs]), 1.0, 0),
                     fmt(mean_std([r.get("precision") for r in recs])),
                     fmt(mean_std([r.get("recall") for r in recs])),
                     fmt(mean_std([r.get("inspect_seconds") for r in recs]), 1.0, 1),
                     _passes(recs), "; ".join(notes)])
    return rows
