"""FT-SAM (Zhu et al., ICCV 2023): one (adaptive) SAM step equals a hand computation, batch-norm
statistics move once per step, the repair removes the digits BadNet where plain fine-tuning with
the same schedule does not, is seeded, leaves the given model alone, and runs on every
architecture and through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import net_state as state
from conftest import same_state as same
from torch import nn

from backdoorlab.cli import main
from backdoorlab.data import ImageSet
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.models import Classifier, InputSpec, build, save_model
from backdoorlab.repairs import DefenderData, repair
from backdoorlab.repairs.ft_sam import sam_step, smoothed_ce


def _grads(W, b, x, y):
    """Cross-entropy gradients of a linear model z = x W^T + b, by hand (float64)."""
    z = x @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = (p - np.eye(W.shape[0])[y]) / len(x)
    return r.T @ x, r.sum(0)


@pytest.mark.parametrize("adaptive", [True, False])
def test_one_sam_step_equals_the_hand_computation(adaptive):
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    x, y = rng.normal(size=(5, 4)), np.array([0, 1, 2, 1, 0])
    rho, lr = 0.7, 0.3
    gW, gb = _grads(W, b, x, y)
    tW, tb = (np.abs(W), np.abs(b)) if adaptive else (1.0, 1.0)
    norm = np.sqrt(((tW * gW) ** 2).sum() + ((tb * gb) ** 2).sum())
    eW, eb = rho * tW ** 2 * gW / norm, rho * tb ** 2 * gb / norm
    gW2, gb2 = _grads(W + eW, b + eb, x, y)
    want_W, want_b = W - lr * gW2, b - lr * gb2

    lin = nn.Linear(4, 3).double()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W))
        lin.bias.copy_(torch.from_numpy(b))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(lin.parameters(), lr=lr)

    def loss_fn():
        out = lin(xt)
        return smoothed_ce(out, yt), out

    loss, _ = sam_step(lin, list(lin.parameters()), loss_fn, opt, rho, adaptive)
    assert np.allclose(lin.weight.detach().numpy(), want_W, atol=1e-12)
    assert np.allclose(lin.bias.detach().numpy(), want_b, atol=1e-12)
    assert float(loss) == pytest.approx(float(nn.functional.cross_entropy(
        torch.from_numpy(x @ W.T + b), yt)))
    # rho = 0 is plain gradient descent
    lin2 = nn.Linear(4, 3).double()
    with torch.no_grad():
        lin2.weight.copy_(torch.from_numpy(W))
        lin2.bias.copy_(torch.from_numpy(b))
    sam_step(lin2, list(lin2.parameters()), lambda: _fwd(lin2, xt, yt),
             torch.optim.SGD(lin2.parameters(), lr=lr), 0.0, adaptive)
    assert np.allclose(lin2.weight.detach().numpy(), W - lr * gW, atol=1e-12)


def test_label_smoothing_of_the_paper_code():
    z = torch.tensor([[2.0, 0.5, -1.0]])
    y = torch.tensor([0])
    target = torch.tensor([[0.8, 0.1, 0.1]])  # 1 - s, s / (C - 1)
    want = -(target * torch.log_softmax(z, 1)).sum()
    assert float(smoothed_ce(z, y, 0.2)) == pytest.approx(float(want))
    assert float(smoothed_ce(z, y, 0.0)) == pytest.approx(float(nn.functional.cross_entropy(z, y)))


def test_batch_norm_statistics_move_once_per_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).train()
    ref = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).train()
    ref.load_state_dict(net.state_dict())
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with torch.no_grad():
        ref(x)  # one ordinary training-mode pass at the unperturbed weights
    sam_step(net, list(net.parameters()), lambda: _fwd(net, x, y),
             torch.optim.SGD(net.parameters(), lr=0.1), 2.0)
    assert torch.allclose(net[1].running_mean, ref[1].running_mean)
    assert torch.allclose(net[1].running_var, ref[1].running_var)
    assert int(net[1].num_batches_tracked) == 1 and net[1].momentum == ref[1].momentum


def _fwd(net, x, y):
    out = net(x)
    return smoothed_ce(out, y), out


def test_defaults_remove_the_backdoor_where_plain_fine_tuning_does_not(badnet):
    clf, data, test, sets = badnet
    given = state(clf)
    _, res = repair("ft-sam", clf, data, test, sets)
    assert same(given, state(clf))                       # the given model is untouched
    _, plain = repair("ft-sam", clf, data, test, sets, {"rho": 0.0})  # same schedule, no SAM
    assert res.before.asr > 0.9
    assert res.after.asr < 0.1                           # measured: 0.956 -> 0.000
    assert plain.after.asr > res.after.asr + 0.4         # measured: 0.746
    # the paper's GTSRB radius on this 38k-parameter net costs accuracy (0.949 -> 0.671): the test
    # holds it to what was measured, far above chance
    assert res.after.clean_accuracy > 0.5
    ep = res.details["per_epoch"]
    assert res.details["select_accuracy"] == max(e["select_accuracy"] for e in ep)


def test_seeded_runs_are_identical_and_the_seed_matters(badnet):
    clf, data, _, _ = badnet
    a, ra = repair("ft-sam", clf, data, None, [], {"epochs": 2})
    b, rb = repair("ft-sam", clf, data, None, [], {"epochs": 2})
    c, _ = repair("ft-sam", clf, data, None, [], {"epochs": 2, "seed": 1})
    assert same(state(a), state(b)) and ra.details == rb.details
    assert not same(state(a), state(c))


@pytest.mark.parametrize("arch,shape", [("gtsrb_cnn", (32, 32, 3)), ("deepid", (55, 47, 3)),
                                        ("small_cnn", (16, 16, 1))])
def test_runs_on_every_architecture(arch, shape):
    torch.manual_seed(0)
    clf = Classifier(build(arch, 5, shape), InputSpec(*shape), 5, arch)
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, (24, *shape), dtype=np.uint8), np.arange(24) % 5, 5)
    given = state(clf)
    model, res = repair("ft-sam", clf, DefenderData(clean=data), None, [],
                        {"epochs": 1, "batch_size": 8})
    assert same(given, state(clf)) and not same(given, state(model))
    assert res.details["best_epoch"] == 1 and res.passes > 0
    assert all(torch.isfinite(v).all() for v in model.net.state_dict().values()
               if v.is_floating_point())


def test_cli(badnet, tmp_path, capsys):
    clf, data, test, _ = badnet
    save_model(clf, tmp_path / "model.safetensors")
    write_csaw_h5(data.clean, tmp_path / "valid.h5")
    write_csaw_h5(test, tmp_path / "test.h5")
    code = main(["repair", "ft-sam", str(tmp_path / "model.safetensors"), "--valid",
                 str(tmp_path / "valid.h5"), "--test", str(tmp_path / "test.h5"), "--out",
                 str(tmp_path / "out"), "--epochs", "1", "--rho", "2", "--no-adaptive"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["method"] == "ft-sam" and res["options"]["adaptive"] is False
    assert res["options"]["rho"] == 2.0 and (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as e:
        main(["repair", "ft-sam", str(tmp_path / "model.safetensors"), "--valid",
              str(tmp_path / "valid.h5"), "--out", str(tmp_path / "bad"), "--rho", "-1"])
    assert e.value.code == 2 and "rho" in capsys.readouterr().err
