"""Neural Cleanse with the schedule constants of the authors' example scripts against ours, on the
models of the zoo (docs/detection.md, "Checked against the authors' code").

The scripts (``gtsrb_visualize_example.py`` of bolunwang/backdoor; BackdoorBench's ``nc``
configuration agrees) check the cost schedule once per epoch, multiply the cost by 2 and stop
early at threshold 1.0 after 5 x patience epochs; our defaults check after every step, multiply by
1.5 and stop at 0.99 after 10 x patience checks. This script runs ``backdoorlab detect
neural-cleanse`` with the scripts' constants (set on every `NCConfig` the detector builds;
everything else as our default, ``mode fast`` included) on each digits zoo model that has a
Neural Cleanse cell, writes the scans under ``--out`` (resumable: finished models are skipped)
and prints each model's flags and calibrated p-value next to the zoo cell's (our defaults).
``--settings`` names the zoo files (default: the two digits ones; ``gtsrb,gtsrb-attacks`` the
GTSRB models, 10-25 minutes each on one thread); ``--only`` keeps the models whose
``ATTACK-sSEED`` matches a regular expression.

    nice python benchmarks/nc_schedule_zoo.py [--settings digits-small,digits-short] [--only RE]

Needs the zoo's runs (``benchmarks/zoo.py``) in this workspace.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = "digits-small,digits-short"


def scripts_constants() -> None:
    """Make every `NCConfig` use the example scripts' schedule constants."""
    import backdoorlab.defenses.neural_cleanse as nc

    orig = nc.NCConfig.validate

    def validate(self) -> None:
        self.check_every = None  # once per epoch
        self.cost_multiplier = 2.0
        self.early_stop_threshold = 1.0
        self.early_stop_patience = 5 * self.patience
        orig(self)

    nc.NCConfig.validate = validate


def verdict(path: str) -> tuple:
    d = json.loads(Path(path).read_text())
    return d.get("flagged"), d.get("p_value"), (d.get("cost") or {}).get("image_passes")


def main() -> None:
    import torch

    from backdoorlab.cli import main as cli

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=str(ROOT / "runs" / "zoo"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "nc-authors"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", default=SETTINGS, help="zoo files, comma-separated")
    ap.add_argument("--only", default="", help="regular expression on ATTACK-sSEED")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scripts_constants()
    for setting in args.settings.split(","):
        cells = Path(args.zoo) / setting / "cells"
        for scan in sorted(glob.glob(f"{cells}/*-neural-cleanse-s*")):
            m = re.match(r"(.+)-neural-cleanse-(s\d+)-", os.path.basename(scan))
            if not m or not os.path.exists(f"{scan}/results.json"):
                continue
            attack, seed = m.groups()
            if args.only and not re.search(args.only, f"{attack}-{seed}"):
                continue
            models = [c for c in glob.glob(f"{cells}/{attack}-{seed}-*")
                      if os.path.exists(f"{c}/model.safetensors")]
            if not models:
                continue
            out = Path(args.out) / setting / f"{attack}-{seed}"
            if not (out / "results.json").exists():
                cli(["detect", "neural-cleanse", f"{models[0]}/model.safetensors", "--clean",
                     f"{models[0]}/clean_valid.h5", "--out", str(out)])
            (fz, pz, nz), (fa, pa, na) = verdict(f"{scan}/results.json"), verdict(str(out / "results.json"))
            print(f"{setting} {attack} {seed}: ours {fz} p {pz:.3f}; scripts' {fa} p {pa:.3f}; "
                  f"passes x{na / nz:.2f}", flush=True)


if __name__ == "__main__":
    main()
