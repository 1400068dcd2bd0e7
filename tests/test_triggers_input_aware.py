"""The input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): options and specs, the mask
network's training, the trainer's differentiable hook, and on the digits the paper's two claims —
the backdoor implants, and a trigger made for one image does not work on another (cross-trigger
test) — against the same attack trained without cross-trigger samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backdoorlab.attacks.runner import AttackPlan, train_attack
from backdoorlab.cli import main
from backdoorlab.data import load_dataset
from backdoorlab.errors import BadInput
from backdoorlab.train import TrainConfig
from backdoorlab.triggers import make_trigger
from backdoorlab.triggers.input_aware import InputAwareTrigger

SMALL = "input-aware:mask_epochs=10,width=16,steps=2,mask_density=0.1"


def digits():
    data = load_dataset("digits", size=16)
    return data.split(0.25, seed=1000)


def attack(spec: str, epochs: int):
    train, test = digits()
    plan = AttackPlan(triggers=[spec], targets=[0], rate=0.1)
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, seed=1)
    clf, out, art = train_attack(train, test, "small_cnn", plan, cfg, 0.1, seed=1)
    return clf, out, art["triggers"][0], test


def test_spec_options_and_bounds():
    t = make_trigger("input-aware:mask_density=0.05,cross_rate=0.2,steps=2", (16, 16, 1))
    assert isinstance(t, InputAwareTrigger)
    assert (t.mask_density, t.cross_rate, t.steps, t.width, t.mask_epochs) == (0.05, 0.2, 2, 32, 25)
    assert t.to_dict()["kind"] == "input-aware" and t.to_dict()["lambda_norm"] == 100.0
    with pytest.raises(BadInput, match="too small for steps=5"):
        make_trigger("input-aware:steps=5", (16, 16, 1))
    with pytest.raises(BadInput, match="mask_density"):
        make_trigger("input-aware:mask_density=0", (16, 16, 1))
    with pytest.raises(BadInput, match="cannot read 'kitty.png'"):
        make_trigger("input-aware:kitty.png", (16, 16, 1))


def test_apply_before_training_refuses_with_one_clear_line():
    t = make_trigger("input-aware", (32, 32, 3))
    with pytest.raises(BadInput, match="only works inside 'backdoorlab attack'"):
        t.apply(np.zeros((2, 32, 32, 3), np.uint8))


def test_mask_training_is_seeded_and_approaches_the_density():
    train, _ = digits()
    masks = []
    for _ in range(2):
        t = make_trigger("input-aware:mask_epochs=6,width=8,steps=2,mask_density=0.1", (16, 16, 1))
        t.prepare(train, 0, seed=3)
        masks.append({k: v.clone() for k, v in t.nets["M"].state_dict().items()})
        # the density loss pulls the soft masks' mean coverage from about 0.5 (untrained) down
        assert t.last_run["mask_density"] < 0.2, t.last_run
    assert all(np.array_equal(masks[0][k].numpy(), masks[1][k].numpy()) for k in masks[0])


@pytest.mark.slow
def test_the_digits_backdoor_implants_and_its_triggers_are_not_reusable():
    clf, out, trig, test = attack(SMALL, 150)
    assert out.clean_accuracy >= 0.95
    assert out.asr[0] >= 0.8, out.asr
    assert out.settings["train"]["keep_best"] is False  # the last epoch, where the trigger is learnt
    info = out.poison["trigger_training"]
    assert info["cross_accuracy"] >= 0.7, info  # another image's trigger leaves the label alone
    # the trigger is input-specific: every image gets its own pattern, uint8 in and out
    x = test.images[:20]
    y = trig.apply(x)
    assert y.dtype == np.uint8 and y.shape == x.shape
    assert len({img.tobytes() for img in y}) == 20
    assert np.array_equal(trig.apply(x), y)  # deterministic once trained
    # without cross-trigger samples the attack still implants, but its triggers are reusable
    clf0, out0, trig0, _ = attack(SMALL + ",cross_rate=0", 40)
    assert out0.asr[0] >= 0.6, out0.asr
    assert out0.poison["trigger_training"]["cross_accuracy"] < info["cross_accuracy"] - 0.2


def test_the_attack_command_trains_it_and_poison_refuses_it(tmp_path, capsys):
    out = tmp_path / "ia"
    assert main(["attack", "--data", "digits", "--size", "16", "--arch", "small_cnn", "--epochs", "2",
                 "--trigger", "input-aware:mask_epochs=1,width=8,steps=2", "--target", "0", "--rate", "0.1",
                 "--train-limit", "400", "--test-limit", "100", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["plan"]["triggers"] == ["input-aware:mask_epochs=1,width=8,steps=2"]
    assert set(res["poison"]["trigger_training"]) >= {"mask_density", "cross_accuracy", "mask_seconds"}
    assert (out / "poisoned_test.h5").is_file() and (out / "trigger_preview.png").is_file()
    capsys.readouterr()
    code = main(["poison", "digits", "--size", "16", "--trigger", "input-aware", "--target", "0",
                 "--rate", "0.1", "--out", str(tmp_path / "p.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "only works inside 'backdoorlab attack'" in err[0], err
    assert not (tmp_path / "p.h5").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device on this machine")
def test_input_aware_trains_and_stamps_on_cuda():
    train, test = digits()
    plan = AttackPlan(triggers=["input-aware:mask_epochs=1,width=8,steps=2"], targets=[0], rate=0.1)
    clf, out, art = train_attack(train, test, "small_cnn", plan, TrainConfig(epochs=2, batch_size=64, seed=1),
                                 0.1, seed=1, device="cuda")
    trig = art["triggers"][0]
    assert next(trig.nets["G"].parameters()).device.type == "cuda"
    y = trig.apply(test.images[:8])  # stamped on the GPU, returned as host uint8
    assert y.dtype == np.uint8 and y.shape == test.images[:8].shape
    assert 0.0 <= out.asr[0] <= 1.0 and 0.0 <= out.poison["trigger_training"]["cross_accuracy"] <= 1.0
