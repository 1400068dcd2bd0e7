"""Neural Attention Distillation (`backdoorlab.repairs.nad`): the attention map and loss by hand,
the distillation layers found on every architecture, beta = 0 being plain fine-tuning, distillation
pulling the student's maps to the teacher's, and the repair on the digits BadNet, on random
gtsrb_cnn / DeepID models and through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backdoorlab.cli import main
from backdoorlab.data import ImageSet
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.defenses.fine_pruning import finetune_split
from backdoorlab.errors import BadInput
from backdoorlab.models import Classifier, InputSpec, build, save_model
from backdoorlab.poisoned import poisoned_set
from backdoorlab.repairs import DefenderData, nad, repair

SMALL = {"epochs": 1, "teacher_epochs": 1, "batch_size": 32}


def random_model(arch: str, k: int, shape: tuple[int, int, int], seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(build(arch, k, shape), InputSpec(*shape), k, arch)


def random_data(k: int, shape: tuple[int, int, int], n: int = 40, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, k, n), k)


def state(clf: Classifier) -> dict:
    return {k: v.clone() for k, v in clf.net.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_attention_map_and_loss_match_a_hand_computation():
    a = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]],
                       [[1.0, 0.0], [2.0, -1.0]]]])          # (1, 2, 2, 2)
    # p = 2: channel mean of a^2 = [[1, 2], [2, 5]], flattened, over its norm sqrt(34)
    want = torch.tensor([[1.0, 2.0, 2.0, 5.0]]) / 34 ** 0.5
    assert torch.allclose(nad.attention_map(a), want)
    # p = 1: channel mean of |a| = [[1, 1], [1, 2]] → over sqrt(7)
    assert torch.allclose(nad.attention_map(a, p=1), torch.tensor([[1.0, 1, 1, 2]]) / 7 ** 0.5)
    b = torch.zeros_like(a)
    b[0, 0, 0, 0] = 3.0                                         # map (1, 0, 0, 0)
    assert torch.equal(nad.attention_map(b), torch.tensor([[1.0, 0, 0, 0]]))
    diff = want - torch.tensor([[1.0, 0, 0, 0]])
    assert nad.attention_loss(a, b).item() == pytest.approx(float((diff ** 2).mean()))
    assert nad.attention_loss(a, 7 * a).item() == pytest.approx(0.0, abs=1e-12)  # scale-free
    assert torch.equal(nad.attention_map(torch.zeros(2, 3, 2, 2)), torch.zeros(2, 4))


def test_distillation_layers_are_found_on_every_architecture():
    assert nad.find_layers(random_model("small_cnn", 10, (16, 16, 1))) == ["conv_1", "conv_2"]
    assert nad.find_layers(random_model("gtsrb_cnn", 43, (32, 32, 3))) == ["conv_2", "conv_4", "conv_6"]
    assert nad.find_layers(random_model("preact_resnet18", 10, (32, 32, 3))) == \
        ["layer2", "layer3", "layer4"]
    assert nad.find_layers(random_model("deepid", 5, (55, 47, 3))) == ["conv_1", "conv_2", "conv_3"]
    assert nad.find_layers(random_model("gtsrb_cnn", 43, (32, 32, 3)), 1) == ["conv_6"]


def keras_clf() -> Classifier:
    """A Keras-2-dialect graph: conv (16x16) → conv 'b.2' (16x16) → pool → conv (8x8) → dense."""
    from backdoorlab.models.keras_graph import KerasGraph, parse_keras_config

    def layer(cls, name, cfg, src):
        return {"class_name": cls, "name": name, "config": {"name": name, **cfg},
                "inbound_nodes": [[[src, 0, 0, {}]]] if src else []}

    conv = {"kernel_size": [3, 3], "strides": [1, 1], "padding": "same", "activation": "relu",
            "use_bias": True}
    layers = [layer("InputLayer", "in", {"batch_input_shape": [None, 16, 16, 1]}, None),
              layer("Conv2D", "a", {"filters": 4, **conv}, "in"),
              layer("Conv2D", "b.2", {"filters": 4, **conv}, "a"),
              layer("MaxPooling2D", "pool", {"pool_size": [2, 2], "strides": [2, 2],
                                             "padding": "valid"}, "b.2"),
              layer("Conv2D", "c", {"filters": 6, **conv}, "pool"),
              layer("Flatten", "flat", {}, "c"),
              layer("Dense", "out", {"units": 3, "activation": "softmax", "use_bias": True}, "flat")]
    options = parse_keras_config({"class_name": "Model", "config": {
        "name": "m", "layers": layers, "input_layers": [["in", 0, 0]], "output_layers": [["out", 0, 0]]}})
    torch.manual_seed(0)
    return Classifier(KerasGraph(options), InputSpec(16, 16, 1), 3, "keras_graph", options)


def test_keras_graph_layers_found_and_repaired():
    clf = keras_clf()
    assert nad.find_layers(clf) == ["b.2", "c"]
    _, res = repair("nad", clf, DefenderData(random_data(3, (16, 16, 1))), options=SMALL)
    assert [d["name"] for d in res.details["layers"]] == ["b.2", "c"]
    assert res.details["layers"][1]["shape"] == [6, 8, 8]


def test_beta_zero_is_plain_fine_tuning_step_for_step(digits_badnet):
    """beta = 0: the student loop takes exactly `train`'s steps (same seed, optimiser, schedule,
    augmentation, best epoch on the held-back share)."""
    from backdoorlab.train import TrainConfig, train

    clf, art, _ = digits_badnet
    o = nad.Options(beta=0, epochs=3, teacher_epochs=1, lr=0.01, lr_after=0.001, lr_drop_epoch=2, seed=3)
    repaired = nad.run(clf, DefenderData(art["valid"]), o)
    tune, select = finetune_split(art["valid"], o.select_fraction, o.seed)
    plain = clf.copy()
    log = train(plain, tune, select, TrainConfig(
        epochs=3, lr=0.01, batch_size=o.batch_size, optimizer="sgd", weight_decay=nad.WEIGHT_DECAY,
        schedule="step", step_size=2, gamma=0.1, crop_padding=2, seed=3))  # 0.01, 0.01, 0.001
    assert same_state(state(repaired.model), state(plain))
    student = repaired.details["student"]
    assert student["best_epoch"] == log.best_epoch
    assert [e["loss"] for e in student["per_epoch"]] == pytest.approx([e["loss"] for e in log.epochs])
    assert all(e["attention"] == 0 for e in student["per_epoch"])


def test_distillation_pulls_the_students_attention_to_the_teachers():
    """With beta = 5000 the attention term falls epoch by epoch and the kept student's maps at the
    layer are closer to the teacher's than at beta = 0 (same seed, same steps otherwise)."""
    clf = random_model("small_cnn", 4, (16, 16, 1), seed=1)
    teacher = random_model("small_cnn", 4, (16, 16, 1), seed=2)  # a different network entirely
    data = random_data(4, (16, 16, 1), n=160, seed=1)
    tune, select = finetune_split(data, 0.2, 0)

    def distance(student) -> float:
        x = student.to_tensor(tune.images)
        got: dict = {}
        hs = [m.layer("conv_2").register_forward_hook(lambda mod, i, out, m=m: got.__setitem__(id(m), out))
              for m in (student, teacher)]
        with torch.no_grad():
            student.net(x)
            teacher.net(x)
        for h in hs:
            h.remove()
        return nad.attention_loss(got[id(student)], got[id(teacher)]).item()

    runs = {}
    for beta in (0.0, 5000.0):
        student = clf.copy()
        o = nad.Options(epochs=4, lr=0.001, beta=beta, crop_padding=0, batch_size=32)
        res = nad.distil(student, teacher, tune, select, [("conv_2", beta)], o)
        runs[beta] = (distance(student), res)
    assert runs[5000.0][0] < 0.8 * runs[0.0][0]
    terms = [e["attention"] for e in runs[5000.0][1]["per_epoch"]]
    assert terms == sorted(terms, reverse=True) and terms[-1] < 0.6 * terms[0]
    assert all(e["attention"] == 0 for e in runs[0.0][1]["per_epoch"])


def test_nad_on_the_digits_badnet(digits_badnet):
    """The digits BadNet (ASR ~96 %): NAD at its defaults (student lr 0.01, BackdoorBench's; the
    paper's 0.1 destroys this BatchNorm-free network, see the module docstring) and 10 epochs (the
    paper's main setting) cuts the ASR and keeps accuracy; the given model untouched."""
    clf, art, test = digits_badnet
    ps, targets = art["poisoned_test"][0]
    ps.meta["targets"] = targets
    given = state(clf)
    model, res = repair("nad", clf, DefenderData(art["valid"]), test, [poisoned_set(ps)])
    assert res.before.asr > 0.9
    assert res.after.asr < res.before.asr - 0.3
    assert res.after.clean_accuracy > res.before.clean_accuracy - 0.05
    d = res.details
    assert [x["name"] for x in d["layers"]] == ["conv_1", "conv_2"]
    # the released code's weights: 500 on the lowest distilled layer, 1000 above it
    assert [x["beta"] for x in d["layers"]] == [500, 1000] and d["crop_padding"] == 2
    assert 0 < d["teacher"]["select_accuracy"] <= 1 and 1 <= d["student"]["best_epoch"] <= 10
    assert len(d["student"]["per_epoch"]) == 10
    assert all(e["attention"] > 0 and e["loss"] == pytest.approx(e["ce"] + e["attention"])
               for e in d["student"]["per_epoch"])
    assert "distilled at conv_1, conv_2" in res.summary
    assert same_state(state(clf), given) and not same_state(state(model), given)


def test_seeded_runs_are_identical():
    clf = random_model("small_cnn", 4, (16, 16, 1))
    data = DefenderData(random_data(4, (16, 16, 1), n=80))
    runs = [repair("nad", clf, data, options={**SMALL, "seed": s})[0] for s in (5, 5, 6)]
    assert same_state(state(runs[0]), state(runs[1]))
    assert not same_state(state(runs[0]), state(runs[2]))


@pytest.mark.parametrize("arch,k,shape,layers", [
    ("gtsrb_cnn", 43, (32, 32, 3), ["conv_2", "conv_4", "conv_6"]),
    ("deepid", 7, (55, 47, 3), ["conv_1", "conv_2", "conv_3"]),
])
def test_runs_on_random_gtsrb_cnn_and_deepid(arch, k, shape, layers):
    clf = random_model(arch, k, shape)
    given = state(clf)
    model, res = repair("nad", clf, DefenderData(random_data(k, shape)), options=SMALL)
    assert [d["name"] for d in res.details["layers"]] == layers
    assert not same_state(state(model), given) and same_state(state(clf), given)
    assert np.isfinite(res.details["student"]["per_epoch"][0]["loss"])


def test_bad_layers_are_one_line_errors():
    clf = random_model("small_cnn", 4, (16, 16, 1))
    data = DefenderData(random_data(4, (16, 16, 1)))
    for layers, words in [("nope", "unknown layer"), ("fc_1", "feature map"),
                          ("conv_2=x", "not a number"), ("conv_2,conv_2", "twice"), (",", "names no")]:
        with pytest.raises(BadInput, match=words):
            repair("nad", clf, data, options={**SMALL, "layers": layers})
    assert nad.parse_layers("conv_1, conv_2=10", 5.0) == [("conv_1", 5.0), ("conv_2", 10.0)]


def test_cli_repair_nad(digits_badnet, tmp_path, capsys):
    clf, art, test = digits_badnet
    save_model(clf, tmp_path / "model.safetensors")
    write_csaw_h5(art["valid"], tmp_path / "valid.h5")
    write_csaw_h5(test, tmp_path / "test.h5")
    argv = ["repair", "nad", tmp_path / "model.safetensors", "--valid", tmp_path / "valid.h5",
            "--test", tmp_path / "test.h5", "--out", tmp_path / "out", "--epochs", "1",
            "--teacher-epochs", "1", "--layers", "conv_2=100", "--lr", "0.01"]
    assert main([str(a) for a in argv]) == 0
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    assert out["method"] == "nad" and out["details"]["layers"][0] == {
        "name": "conv_2", "beta": 100.0, "shape": [32, 8, 8]}
    assert (tmp_path / "out" / "model.safetensors").is_file()
    bad = [*argv[:8], tmp_path / "bad", "--epochs", "1", "--layers", "nope"]
    try:
        code = main([str(a) for a in bad])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "unknown layer" in err and len(err.strip().splitlines()) == 1
