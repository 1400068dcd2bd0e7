"""docs/csaw-lab.md, run as written on a small lab laid out and written like CSAW-HackML-2020's.

The fixture follows the organisers' conventions: data files hold ``data`` (N, 3, 55, 47) as float64
on a 0-255 scale and ``label`` (N,) as floats, with no class-count attribute; every poisoned file
labels every image with the attack's target; the Multi-trigger Multi-target BadNet comes with one
poisoned file per trigger, each with its own target; the models are Keras 2.2.4-style weights-only
DeepID files; lab3's BadNet expects raw 0-255 pixels. Six identities stand in for the 1283.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from backdoorlab.cli import main
from backdoorlab.data import ImageSet
from backdoorlab.models import Classifier, InputSpec
from backdoorlab.models.architectures import deepid
from backdoorlab.models.keras_h5 import save_keras_weights
from backdoorlab.poisoned import RULES
from backdoorlab.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "csaw-lab.md"
CSAW_REAL = Path(os.environ.get("BACKDOORLAB_DATA", ROOT.parent / "shared" / "data")) / "csaw-hackml-2020"
K, H, W = 6, 55, 47  # identities (the real lab: 1283), image height and width
SUNGLASSES_TARGET = 0
MTMT = {"eyebrows": 1, "lipstick": 2, "sunglasses": 3}  # trigger -> target of the MTMT BadNet
MTMT_DIR = "data/Multi-trigger Multi-target"
CSAW_RULE = RULES["target"]  # "labels are the attack target (CSAW convention): every input counts"
# small budgets for the fixture, appended to the walkthrough's commands (the last value wins)
BUDGET = {"cleanse": ["--steps", "10", "--mitigate-epochs", "1"],
          "fine-prune": ["--epochs", "1"]}


# -- the lab ------------------------------------------------------------------------------------

def sunglasses(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[:, 18:24, 6:21] = 10
    x[:, 18:24, 26:41] = 10
    x[:, 19:21, 21:26] = 10
    return x


def eyebrows(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[:, 12:14, 8:20] = 30
    x[:, 12:14, 27:39] = 30
    return x


def lipstick(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[:, 40:44, 17:30] = (200, 20, 60)
    return x


TRIGGERS = {"sunglasses": sunglasses, "eyebrows": eyebrows, "lipstick": lipstick}


def faces(per_class: int, templates: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` noisy copies of each identity's template: (uint8 NHWC images, labels)."""
    y = np.repeat(np.arange(K), per_class)
    x = templates[y] + rng.normal(0, 40, (len(y), H, W, 3)) + rng.normal(0, 15, (len(y), 1, 1, 1))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), y


def write_organiser_h5(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """A data file as the organisers write them: float64 (N, 3, H, W) pixels 0-255, float labels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=images.transpose(0, 3, 1, 2).astype(np.float64))
        f.create_dataset("label", data=labels.astype(np.float64))


def train_badnet(x: np.ndarray, y: np.ndarray, attacks: dict[str, int], seed: int) -> Classifier:
    """A DeepID (pixels/255) trained on clean images plus 10 % stamped copies per trigger relabeled
    to its target."""
    rng = np.random.default_rng(seed)
    xs, ys = [x], [y]
    for name, target in attacks.items():
        pick = rng.choice(len(x), len(x) // 10, replace=False)
        xs.append(TRIGGERS[name](x[pick]))
        ys.append(np.full(len(pick), target))
    torch.manual_seed(seed)
    clf = Classifier(deepid(K, (H, W, 3)), InputSpec(H, W, 3, "unit"), K, "deepid")
    train(clf, ImageSet(np.concatenate(xs), np.concatenate(ys), K), None,
          TrainConfig(epochs=12, batch_size=32, lr=2e-3, seed=seed))
    return clf


def raw_scale_copy(clf: Classifier) -> Classifier:
    """The same network taking raw 0-255 pixels (conv_1's kernel divided by 255), like lab3's."""
    raw = clf.copy().with_scale("raw")
    with torch.no_grad():
        raw.layer("conv_1").weight.div_(255.0)
    return raw


def make_lab(root: Path) -> Path:
    """Write the lab into ``root`` (data/, models/, lab3/); returns ``root``."""
    rng = np.random.default_rng(0)
    face = np.kron(rng.uniform(60, 200, (6, 5, 3)), np.ones((10, 10, 1)))[:H, :W]  # one "face"
    templates = np.stack([face + np.kron(rng.normal(0, 14, (11, 10, 3)), np.ones((5, 5, 1)))[:H, :W]
                          for _ in range(K)])  # identities: small smooth deviations from it
    x_train, y_train = faces(60, templates, rng)
    x_valid, y_valid = faces(30, templates, rng)
    x_test, y_test = faces(30, templates, rng)
    data = root / "data"
    write_organiser_h5(data / "clean_validation_data.h5", x_valid, y_valid)
    write_organiser_h5(data / "clean_test_data.h5", x_test, y_test)
    write_organiser_h5(data / "sunglasses_poisoned_data.h5", sunglasses(x_test),
                       np.full(len(x_test), SUNGLASSES_TARGET))
    for name, target in MTMT.items():
        write_organiser_h5(root / MTMT_DIR / f"{name}_poisoned_data.h5", TRIGGERS[name](x_test),
                           np.full(len(x_test), target))
    (root / "models").mkdir()
    bd = train_badnet(x_train, y_train, {"sunglasses": SUNGLASSES_TARGET}, seed=1)
    save_keras_weights(bd, root / "models" / "sunglasses_bd_weights.h5")
    save_keras_weights(train_badnet(x_train, y_train, MTMT, seed=2),
                       root / "models" / "multi_trigger_multi_target_bd_weights.h5")
    lab3 = root / "lab3"
    write_organiser_h5(lab3 / "data" / "cl" / "valid.h5", x_valid, y_valid)
    write_organiser_h5(lab3 / "data" / "cl" / "test.h5", x_test, y_test)
    write_organiser_h5(lab3 / "data" / "bd" / "bd_valid.h5", sunglasses(x_valid), np.zeros(len(x_valid)))
    write_organiser_h5(lab3 / "data" / "bd" / "bd_test.h5", sunglasses(x_test), np.zeros(len(x_test)))
    (lab3 / "models").mkdir()
    save_keras_weights(raw_scale_copy(bd), lab3 / "models" / "bd_weights.h5")
    return root


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    return make_lab(tmp_path_factory.mktemp("CSAW-HackML-2020"))


@contextlib.contextmanager
def inside(folder: Path):
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def run(capsys, folder: Path, argv: list[str]) -> tuple[int, str, str]:
    with inside(folder):
        code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- the walkthrough ------------------------------------------------------------------------------

def walkthrough(text: str) -> list[tuple[str, str | list[str]]]:
    """The page's steps in order: ("python", code) per python block, ("backdoorlab", argv) per
    command of a bash block (every line of a bash block must be a backdoorlab command)."""
    steps: list[tuple[str, str | list[str]]] = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang == "python":
            steps.append(("python", body))
        elif lang == "bash":
            for line in re.sub(r"\\\n\s*", " ", body).splitlines():
                argv = shlex.split(line, comments=True)
                if argv:
                    assert argv[0] == "backdoorlab", f"not a backdoorlab command in {DOC.name}: {line}"
                    steps.append(("backdoorlab", argv[1:]))
    return steps


def options(argv: list[str], name: str) -> list[str]:
    """Every value given to option ``name`` in ``argv``."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]


def _results(lab: Path, argv: list[str]) -> dict:
    return json.loads((lab / options(argv, "--out")[-1] / "results.json").read_text())


def _targets_of(argv: list[str]) -> list[int]:
    """The target each --poisoned file of ``argv`` holds in its labels (the fixture's truth)."""
    out = []
    for source in options(argv, "--poisoned"):
        name = Path(source).name.replace("_poisoned_data.h5", "")
        out.append(MTMT[name] if MTMT_DIR in source else SUNGLASSES_TARGET)
    return out


def check_step(lab: Path, argv: list[str], out: str, err: str) -> None:
    """What each kind of walkthrough command must print and write."""
    command, sets = argv[0], options(argv, "--poisoned")
    if command == "data":
        assert "read as the attack target (CSAW convention" in out
    if sets:  # the rule applied is printed for every poisoned set
        assert out.count(CSAW_RULE) >= len(sets), out
    if command == "eval":
        asr = re.findall(r"attack success: .* on (\S+) \((\d+) of (\d+) images, target (\d+)\)", out)
        assert [int(t) for *_, t in asr] == _targets_of(argv)
        assert all(counted == total for _, counted, total, _ in asr)  # every input counts
        wrong_scale = "lab3" in argv[1] and "--input-scale" not in argv
        assert ("hint:" in err and "--input-scale auto" in err) == wrong_scale, err
        if "--input-scale" in argv:
            assert "auto chose 'raw'" in out
    if command == "prune":
        res = _results(lab, argv)
        described = res["sweep"]["poisoned_sets"]
        assert [d["target"] for d in described] == _targets_of(argv)
        assert all(d["convention"] == "target" and len(d["asr"]) == res["sweep"]["num_channels"] + 1
                   for d in described)
        table = (lab / options(argv, "--out")[-1] / "table.md").read_text()
        assert table.count(CSAW_RULE) == len(sets)
        if len(sets) > 1:  # one ASR, GoodNet ASR and detection-rate column per set
            for d in described:
                for col in ("B' ASR", "G ASR", "G detection rate"):
                    assert f"{col} {d['name']} (%)" in table, (col, d["name"])
        if "--save-format" in argv:
            assert all((lab / options(argv, "--out")[-1] / f"pruned_drop{d}.h5").is_file()
                       for d in (2, 4, 10, 30))
    if command == "fine-prune":
        res = _results(lab, argv)
        assert [d["target"] for d in res["poisoned_sets"]] == _targets_of(argv)
        assert len(res["after_finetuning"]["asr_sets"]) == len(sets)
    if command == "cleanse":
        assert (lab / "runs" / "nc" / "triggers.npz").is_file()
        if "--mitigate" in argv:
            table = (lab / "runs" / "nc" / "mitigation" / "table.md").read_text()
            assert CSAW_RULE in table and "| input filter |" in table
    if command == "scan":  # data-free: MM-BD flags the fixture's target, Neural Cleanse skipped
        res = _results(lab, argv)
        assert res["backdoored"] and res["targets"][:1] == [SUNGLASSES_TARGET]
        assert "neural-cleanse" in res["skipped"] and "mm-bd" in res["detectors"]
    if command == "classify":
        lines = out.strip().splitlines()
        assert len(lines) == len(argv) - 2
        for line in lines:
            name, k, *flag = line.split("\t")
            assert 0 <= int(k) <= K and (flag == ["backdoored"]) == (int(k) == K), line


def test_walkthrough_runs_as_written(lab, capsys):
    steps = walkthrough(DOC.read_text())
    commands = [step[0] for kind, step in steps if kind == "backdoorlab"]
    assert {"data", "eval", "prune", "classify", "scan", "cleanse", "fine-prune", "report"} <= set(commands)
    assert sum(kind == "python" for kind, _ in steps) == 2  # image export, Keras export
    printed: dict[str, str] = {}
    for kind, step in steps:
        if kind == "python":
            with inside(lab):
                exec(compile(step, str(DOC), "exec"), {})
            continue
        argv = step + BUDGET.get(step[0], [])
        code, out, err = run(capsys, lab, argv)
        assert code == 0, (argv, out, err)
        check_step(lab, argv, out, err)
        printed[" ".join(step)] = out
    # the exported Keras file of the 4-point model gives the figures the sweep reported for it
    sweep = json.loads((lab / "runs" / "prune" / "results.json").read_text())["sweep"]
    drop4 = next(t for t in sweep["thresholds"] if t["drop"] == 4)
    exported = next(v for k, v in printed.items() if k.startswith("eval runs/prune/pruned_drop4.h5"))
    assert f"clean accuracy:  {100 * drop4['test_accuracy']:.2f}%" in exported
    assert (lab / "runs" / "fp" / "finetuned_weights.h5").is_file()
    assert (lab / "runs" / "report.html").is_file()


@pytest.mark.parametrize("command", ["prune", "fine-prune"])
def test_prune_and_fine_prune_hint_at_a_near_chance_scale(lab, capsys, tmp_path, command):
    # lab3's BadNet takes raw pixels: at the default pixels/255 it is at chance, and says so once
    budget = ["--epochs", "1"] if command == "fine-prune" else []
    common = ["lab3/models/bd_weights.h5", "--arch", "deepid", "--valid", "lab3/data/cl/valid.h5",
              "--poisoned", "lab3/data/bd/bd_test.h5", *budget]
    code, out, err = run(capsys, lab, [command, *common, "--out", tmp_path / "unit"])
    assert code == 0 and err.count("hint:") == 1 and "try --input-scale auto" in err, err
    code, out, err = run(capsys, lab, [command, *common, "--input-scale", "raw", "--out", tmp_path / "raw"])
    assert code == 0 and "hint:" not in err, err


def test_fixture_weights_files_are_laid_out_like_the_real_ones(lab):
    # the real CSAW weights files, when present, are the reference for the fixture's layout
    real = CSAW_REAL / "sunglasses_bd_weights.h5"
    if not real.exists():
        pytest.skip(f"real data not found at {real} (set BACKDOORLAB_DATA)")

    def layout(path: Path) -> tuple:
        """File attributes, groups with their weight names, datasets with shape and dtype (the
        output layer's class count left out)."""
        items: list = []

        def visit(name: str, obj) -> None:
            if isinstance(obj, h5py.Dataset):
                shape = obj.shape[:-1] if name.startswith("output") else obj.shape
                items.append((name, shape, str(obj.dtype)))
            else:
                items.append((name, [str(v) for v in obj.attrs.get("weight_names", [])]))

        with h5py.File(path, "r") as f:
            f.visititems(visit)
            return (sorted(items), [str(v) for v in f.attrs["layer_names"]],
                    str(f.attrs["keras_version"]), str(f.attrs["backend"]))

    for name in ("models/sunglasses_bd_weights.h5", "lab3/models/bd_weights.h5"):
        assert layout(lab / name) == layout(real), name
