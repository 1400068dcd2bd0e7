"""Neural Cleanse mitigation (unlearning, neuron pruning, input filter) with a known trigger."""

import json

import numpy as np
import pytest

from backdoorlab.defenses.nc_mitigation import make_filter, mitigate, selection_score, stamped, within_drop
from backdoorlab.errors import BadInput
from backdoorlab.models import load_model, save_model
from backdoorlab.train import TrainConfig


@pytest.fixture(scope="module")
def setup(digits_badnet):
    clf, art, test = digits_badnet
    # the reversed trigger of a perfect Neural Cleanse run: the 3x3 white patch, margin 1
    mask = np.zeros((16, 16), np.float32)
    mask[12:15, 12:15] = 1.0
    triggers = {0: (mask, np.ones((16, 16, 1), np.float32))}
    return clf, art["valid"], test, art["poisoned_test"][0][0], triggers


def test_stamped_matches_the_real_trigger(setup):
    clf, valid, test, ps, triggers = setup
    st, targets = stamped(test, triggers, [0])
    assert np.array_equal(st.images, ps.images) and np.all(targets == 0)


def test_mitigations_lower_the_asr(setup):
    clf, valid, test, ps, triggers = setup
    cfg = TrainConfig(epochs=6, lr=1e-3, batch_size=32, schedule="none")
    res, models = mitigate(clf, valid, test, triggers, [0], ps, None, cfg=cfg)
    by = {m.method: m for m in res.methods}
    base = by["none (the model as given)"]
    assert base.asr > 0.9
    assert by["unlearning"].asr < 0.5 * base.asr
    assert by["neuron pruning"].asr < 0.5 * base.asr
    f = by["input filter"]
    # measured here: 62 % of triggered inputs answered N at 7 % false alarms (top 10 % of 32 channels)
    assert f.detection_rate > 0.5 and f.clean_flagged <= 0.15
    assert set(models) == {"unlearn", "prune", "filter"}
    for m in res.methods:
        assert m.clean_accuracy > 0.6


def test_filter_saves_and_loads(tmp_path, setup):
    clf, valid, test, ps, triggers = setup
    f = make_filter(clf, valid, triggers, [0])
    assert f.num_classes == 11
    path = save_model(f, tmp_path / "filter.safetensors")
    back = load_model(path)
    assert np.array_equal(back.predict(ps.images), f.predict(ps.images))
    # the threshold is calibrated on clean validation data: at most ~5 % of it is flagged
    assert (f.predict(valid.images) == 10).mean() <= 0.06


def test_mitigate_bad_input(setup):
    clf, valid, test, ps, triggers = setup
    with pytest.raises(BadInput, match="no reversed trigger"):
        mitigate(clf, valid, test, triggers, [3], ps)
    with pytest.raises(BadInput, match="unknown mitigation"):
        mitigate(clf, valid, test, triggers, [0], ps, methods=("exorcism",))


def test_cleanse_cli_mitigate(tmp_path, setup, capsys):
    from backdoorlab.cli import main
    from backdoorlab.data.csaw import write_csaw_h5

    clf, valid, test, ps, _ = setup
    save_model(clf, tmp_path / "m.safetensors")
    write_csaw_h5(valid, tmp_path / "v.h5")
    write_csaw_h5(test, tmp_path / "t.h5")
    write_csaw_h5(ps, tmp_path / "p.h5")
    out = tmp_path / "nc"
    rc = main(["cleanse", str(tmp_path / "m.safetensors"), "--clean", str(tmp_path / "v.h5"),
               "--mode", "full", "--labels", "0,1,2", "--steps", "60", "--images", "200",
               "--mitigate", "prune,filter", "--mitigate-labels", "0", "--test", str(tmp_path / "t.h5"),
               "--poisoned", str(tmp_path / "p.h5"), "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "mitigation" / "results.json").read_text())
    assert res["kind"] == "mitigate" and [m["method"] for m in res["methods"]][1:] == ["neuron pruning",
                                                                                       "input filter"]
    assert (out / "mitigation" / "filter.safetensors").is_file()


def test_within_drop_judges_the_budget_by_evidence():
    # 30 held-back images, all right before unlearning, a 2-point budget: under Binomial(30, 0.98)
    # P(X <= 28) = 0.12 (no evidence of a larger drop) and P(X <= 27) = 0.022 (evidence)
    assert within_drop(1.0, 1.0, 30, 2.0)
    assert within_drop(28 / 30, 1.0, 30, 2.0)
    assert not within_drop(27 / 30, 1.0, 30, 2.0)
    # on 10,000 images the test approaches the plain cut-off at max_drop points
    assert within_drop(0.975, 0.99, 10_000, 2.0)
    assert not within_drop(0.96, 0.99, 10_000, 2.0)
    # a rise is always within budget; a zero budget still tolerates no evident drop
    assert within_drop(0.99, 0.9, 50, 0.0)
    assert not within_drop(0.5, 1.0, 50, 0.0)


def test_selection_trades_trigger_success_against_accuracy():
    # held-back figures of GTSRB BadNets unlearning (390 images, given model 100 %): epoch 2 had
    # the lowest trigger success (0.1 %) but 97.4 % accuracy; epoch 9 had 0.3 % at 99.5 %
    base, n = 1.0, 390
    e2 = selection_score(0.974, 0.001, base, n, 2.0)
    e9 = selection_score(0.995, 0.003, base, n, 2.0)
    e7 = selection_score(0.997, 0.022, base, n, 2.0)
    given = selection_score(1.0, 0.953, base, n, 2.0)
    assert e9 > e2 and e9 > e7 and min(e2, e7) > given
    # an epoch beyond the accuracy budget ranks below the given model, however low its trigger
    # success: the repair then keeps the model as given rather than one that only costs accuracy
    beyond = selection_score(0.944, 0.0, base, n, 2.0)
    assert beyond < given
    assert selection_score(0.95, 0.0, base, n, 2.0) < selection_score(0.90, 0.0, base, n, 20.0)


def test_repair_labels_keep_the_flags_the_calibration_supports():
    from backdoorlab.defenses.neural_cleanse import repair_labels

    # GTSRB BadNets seed 0 and 1 (docs/repairs-gtsrb.md): the target 0 alone
    assert repair_labels([0, 25], {"0": 0.009, "25": 0.495}) == [0]
    assert repair_labels([0, 1, 25, 2], {"0": 0.173, "1": 0.9, "25": 1.0, "2": 0.6}) == [0]
    # a multi-target attack: every flag with a small p-value, in the scan's order
    assert repair_labels([5, 3, 7], {5: 0.001, 3: 0.02, 7: 0.5}) == [5, 3]
    # no p-value on record (a detector without one flags by its own rule): every flag; nothing
    # flagged: nothing
    assert repair_labels([4, 0], {}) == [4, 0] and repair_labels([], {"0": 0.001}) == []


def test_unlearn_runs_at_least_min_steps_and_breaks_ties_by_the_triggers_pull(setup):
    from backdoorlab.defenses.fine_pruning import finetune_split
    from backdoorlab.defenses.nc_mitigation import target_probability, unlearn

    clf, valid, test, ps, triggers = setup
    cfg = TrainConfig(epochs=2, lr=0.01, batch_size=64, optimizer="sgd", schedule="none")
    _, short = unlearn(clf, valid, triggers, [0], cfg=cfg, min_steps=0)
    per_epoch = -(-short["tune_images"] // 64)
    assert short["epochs"] == 2 and short["steps"] == 2 * per_epoch
    model, info = unlearn(clf, valid, triggers, [0], cfg=cfg, min_steps=10 * per_epoch + 1)
    assert info["epochs"] == 11 and info["steps"] >= 10 * per_epoch + 1
    epochs = info["per_epoch"]
    assert len(epochs) == 12  # the given model and 11 epochs
    # the kept epoch: best held-back accuracy minus trigger success, then the lowest pull
    def rank(e: dict) -> tuple[float, float]:
        return (selection_score(e["select_accuracy"], e["select_trigger_asr"], epochs[0]["select_accuracy"],
                                info["select_images"], 2.0), -e["select_trigger_probability"])

    assert rank(epochs[info["best_epoch"]]) == max(rank(e) for e in epochs)
    kept = epochs[info["best_epoch"]]
    # the probability reported is the kept model's own on the stamped held-back images (the split
    # unlearn makes with its default select_fraction 0.2 and seed 0)
    _, select = finetune_split(valid, 0.2, 0)
    check, tg = stamped(select, triggers, [0])
    assert kept["select_trigger_probability"] == pytest.approx(target_probability(model, check.images, tg))
    st, targets = stamped(test, triggers, [0])
    assert target_probability(model, st.images, targets) < target_probability(clf, st.images, targets)


def test_train_keeps_the_earliest_of_equal_scores_and_reads_tuples_in_order(setup):
    from backdoorlab.train import train

    clf, valid, *_ = setup
    cfg = TrainConfig(epochs=3, lr=1e-4, batch_size=64, schedule="none")
    calls = iter(range(100))
    log = train(clf.copy(), valid, None, cfg, score=lambda: (1.0, {}))
    assert log.best_epoch == 0
    log = train(clf.copy(), valid, None, cfg, score=lambda: ((1.0, next(calls)), {}))
    assert log.best_epoch == 3  # equal first elements: the second decides
