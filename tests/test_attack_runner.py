"""The attack runner and `backdoorlab attack` on the embedded digits (small and fast)."""

import json

import numpy as np
import pytest

from backdoorlab.attacks.runner import AttackPlan, train_attack
from backdoorlab.cli import main
from backdoorlab.data.csaw import read_csaw_h5
from backdoorlab.data.digits import load_digits
from backdoorlab.models import load_model
from backdoorlab.train import TrainConfig

CFG = TrainConfig(epochs=12, batch_size=64, lr=2e-3, seed=0)


@pytest.fixture(scope="module")
def digits_split():
    d = load_digits()
    return d.split(0.2, seed=5)


def test_badnets_on_digits_learns_the_backdoor(digits_split):
    train_data, test = digits_split
    plan = AttackPlan(triggers=["patch:size=3"], targets=[0], rate=0.1)
    clf, out, art = train_attack(train_data, test, "small_cnn", plan, CFG)
    assert out.clean_accuracy > 0.85
    assert out.asr[0] > 0.9
    ps, targets = art["poisoned_test"][0]
    assert np.all(ps.labels != 0) and np.all(targets == 0)  # target-class images left out
    assert len(ps) == int((test.labels != 0).sum())
    assert out.settings["valid_count"] + out.settings["train_count"] == len(train_data)


def test_clean_reference_has_low_asr_on_the_same_trigger(digits_split):
    train_data, test = digits_split
    clean, out, _ = train_attack(train_data, test, "small_cnn", AttackPlan(), CFG)
    assert out.asr == [] and out.clean_accuracy > 0.85
    from backdoorlab.attacks.poison import attack_success, make_poisoned_test_set
    from backdoorlab.triggers import make_trigger

    ps, t = make_poisoned_test_set(test, make_trigger("patch:size=3", test.shape), 0)
    assert attack_success(clean, ps, t) < 0.3


def test_attack_cli_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["attack", "--data", "digits", "--arch", "small_cnn", "--trigger", "patch:size=3",
               "--target", "0", "--trigger", "patch:size=3,pos=tl", "--target", "1", "--rate", "0.08",
               "--epochs", "10", "--batch-size", "64", "--lr", "0.002", "--out", str(out)])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "model.json", "clean_valid.h5", "clean_test.h5", "poisoned_test_1.h5",
            "poisoned_test_2.h5", "trigger_preview.png", "results.json"} <= names
    res = json.loads((out / "results.json").read_text())
    assert len(res["asr"]) == 2 and all(a > 0.8 for a in res["asr"])
    p2 = read_csaw_h5(out / "poisoned_test_2.h5")
    assert np.all(p2.meta["targets"] == 1) and np.all(p2.labels != 1)
    capsys.readouterr()
    assert main(["eval", str(out / "model.safetensors"), "--clean", str(out / "clean_test.h5"),
                 "--poisoned", str(out / "poisoned_test_2.h5"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["asr"] == pytest.approx(res["asr"][1])
    assert load_model(out / "model.safetensors").provenance["targets"] == [0, 1]


@pytest.mark.parametrize("args,msg", [
    (["--trigger", "patch"], "--target"),
    (["--trigger", "patch", "--target", "0", "--target", "1"], "target"),
    (["--trigger", "warp", "--target", "0"], "unknown kind"),
    (["--trigger", "patch", "--target", "10"], "out of range"),
    (["--trigger", "patch", "--mode", "all2all", "--target", "1"], "all-to-all"),
])
def test_attack_cli_bad_input(tmp_path, capsys, args, msg):
    out = tmp_path / "run"
    rc = main(["attack", "--data", "digits", "--arch", "small_cnn", "--epochs", "1", "--out", str(out),
               *args])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
    assert not out.exists()


def test_pruning_aware_attack_reinstates_channels(digits_split):
    train_data, test = digits_split
    plan = AttackPlan(triggers=["patch:size=3"], targets=[0], rate=0.1, pruning_aware=True,
                      pa_max_drop=4.0, pa_dormant_shift=50.0)
    clf, out, _ = train_attack(train_data, test, "small_cnn", plan, CFG)
    pa = out.pruning_aware
    assert pa["layer"] == "conv_2" and 0 < len(pa["pruned_channels"]) < pa["channels"]
    assert pa["valid_asr_pruned"] > 0.8  # the backdoor lives in the kept channels
    # reinstated channels pushed dormant: the model behaves like the pruned one on poisoned inputs
    assert out.asr[0] > 0.8 and abs(pa["valid_asr_final"] - pa["valid_asr_pruned"]) < 0.05
    conv = clf.layer("conv_2")
    assert conv.bias[pa["pruned_channels"]].max().item() < -40
    # no hook is left on the model: the reinstated network is an ordinary small_cnn
    assert not clf.layer("conv_2")._forward_hooks
