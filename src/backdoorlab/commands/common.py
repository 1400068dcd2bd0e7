"""Options and loaders shared by the CLI commands (parsing only; no algorithm)."""

from __future__ import annotations

import argparse

from backdoorlab.errors import BadInput


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")




def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="architecture of a Keras weights-only file (e.g. deepid)")
    p.add_argument("--input-scale", choices=["raw", "unit", "auto"], default=None,
                   help="pixel scale the network takes: raw = 0-255, unit = pixels/255, auto = "
                        "try both on the clean data and keep the more accurate (default: the "
                        "scale stored with the model; Keras files: unit)")
    p.add_argument("--num-classes", type=int, help="class count, if it cannot be read from the "
                   "model file")


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=["train", "test"], default=None,
                   help="which split of a data set that holds both (default: test for evaluation)")
    p.add_argument("--size", type=int, help="resize images to SIZE x SIZE where the reader can")


def load_model_from_args(args: argparse.Namespace, clean=None):
    """Load the model named by ``args.model``; resolve ``--input-scale auto`` against ``clean``."""
    from backdoorlab.models.files import load_model

    scale = args.input_scale
    clf = load_model(args.model, arch=args.arch, input_scale=scale,
                     num_classes=getattr(args, "num_classes", None))
    if scale == "auto":
        if clean is None:
            raise BadInput("--input-scale auto needs clean labeled data to decide")
        from backdoorlab.evaluate import check_compatible, choose_input_scale

        check_compatible(clf, clean, "clean data")
        clf, scores = choose_input_scale(clf, clean)
        print(f"input scale: auto chose {clf.spec.scale!r} (clean accuracy on a sample: "
              + ", ".join(f"{k} {v:.2%}" for k, v in scores.items()) + ")")
    return clf


def load_data(source: str, args: argparse.Namespace, default_split: str = "test",
              num_classes: int | None = None):
    from backdoorlab.data import load_dataset

    return load_dataset(source, split=getattr(args, "split", None) or default_split,
                        size=getattr(args, "size", None), num_classes=num_classes)


