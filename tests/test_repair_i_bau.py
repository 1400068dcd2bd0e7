"""I-BAU (Zeng et al., ICLR 2022): the implicit hypergradient is the derivative of the outer loss
at the inner fixed point, the perturbation keeps its bound and valid pixels, the repair lowers the
digits BadNet's ASR at small accuracy cost, is seeded, leaves the given model alone, and runs on
every architecture and through the CLI."""

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
from backdoorlab.repairs.i_bau import (
    Options,
    hypergradient,
    net_input,
    perturbed,
    project,
    search_perturbation,
)


def test_defaults_lower_the_asr_at_small_accuracy_cost_and_keep_the_bound(badnet):
    clf, data, test, sets = badnet
    given = state(clf)
    _, res = repair("i-bau", clf, data, test, sets)
    assert same(given, state(clf))                       # the given model is untouched
    assert res.before.asr > 0.9
    assert res.after.asr < 0.1                           # the last round kept, as the paper
    assert res.after.clean_accuracy > res.before.clean_accuracy - 0.15
    rounds = res.details["rounds"]
    assert len(rounds) == Options().rounds and res.details["best_round"] == len(rounds)
    assert all(r["delta_l2"] <= Options().norm_bound + 1e-4 for r in rounds)
    _, best = repair("i-bau", clf, data, test, sets, {"keep": "best-accuracy"})
    assert best.details["select_accuracy"] == max(r["select_accuracy"] for r in best.details["rounds"])
    print(f"\ni-bau last round: acc {res.after.clean_accuracy:.3f} ASR {res.after.asr:.3f}; best-accuracy "
          f"round {best.details['best_round']}: acc {best.after.clean_accuracy:.3f} ASR {best.after.asr:.3f}")


def test_seeded_runs_are_identical_and_the_seed_matters(badnet):
    clf, data, _, _ = badnet
    opts = {"rounds": 1, "fixed_point_steps": 2}
    a, ra = repair("i-bau", clf, data, None, [], opts)
    b, rb = repair("i-bau", clf, data, None, [], opts)
    c, _ = repair("i-bau", clf, data, None, [], {**opts, "seed": 1})
    assert same(state(a), state(b)) and ra.details == rb.details
    assert not same(state(a), state(c))


def test_perturbation_respects_the_bound_and_pixels_stay_valid_when_clipped(badnet):
    clf, data, _, _ = badnet
    x01 = torch.from_numpy(data.clean.images[:40]).float() / 255
    d = torch.full((1, *x01.shape[1:]), 0.7)
    d[..., :4, :] = -0.9
    out = perturbed(x01, d, clip=True)
    assert out.min() >= 0 and out.max() <= 1 and (out == 1).any() and (out == 0).any()
    # unclipped (the default, as in the paper's formula and its defense.py): x + delta exactly
    assert torch.equal(perturbed(x01, d), x01 + d) and perturbed(x01, d).max() > 1
    assert float(project(d, 2.0).norm()) == pytest.approx(2.0, rel=1e-5)
    assert torch.equal(project(d * 1e-3, 2.0), d * 1e-3)        # inside the ball: unchanged
    model = clf.copy()
    batches = [torch.arange(i, min(i + 16, 40)) for i in range(0, 40, 16)]
    for bound in (0.5, 3.0):
        delta = search_perturbation(model, x01, batches, Options(norm_bound=bound))
        assert float(delta.norm()) <= bound + 1e-5 and float(delta.norm()) > 0
    # a tight bound is recorded round by round in the repair's details
    _, res = repair("i-bau", clf, data, None, [], {"rounds": 2, "norm_bound": 0.25,
                                                   "fixed_point_steps": 1})
    assert all(r["delta_l2"] <= 0.25 + 1e-6 for r in res.details["rounds"])


def test_hypergradient_is_the_derivative_at_the_inner_fixed_point():
    """On a tiny linear model whose inner problem is strongly convex (large ||delta||^2 weight), the
    implicit hypergradient with many fixed-point steps equals finite differences of
    theta -> L_out(delta*(theta), theta), delta* solved to convergence; without the implicit term
    it does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny steps: thread hand-offs would dominate
    try:
        _check_fixed_point_derivative()
    finally:
        torch.set_num_threads(threads)


def _check_fixed_point_derivative():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    clf = Classifier(net, InputSpec(2, 2, 1), 3, channels_last=False)
    params = list(net.parameters())
    x = 0.3 + 0.4 * torch.rand(6, 2, 2, 1)          # no clipping anywhere near
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    carry = torch.ones(6, 1, 1, 1)
    o = Options(inner_reg=2.0, fixed_point_step=0.2, fixed_point_steps=60)

    @torch.enable_grad()
    def solve():  # delta* by iterating the inner map to convergence
        d = torch.zeros(1, 2, 2, 1)
        for _ in range(40):  # the map contracts by about 0.2 per step
            d = d.requires_grad_(True)
            inner = (-nn.functional.cross_entropy(net(net_input(clf, perturbed(x, d))), y)
                     + o.inner_reg * d.pow(2).sum())
            (g,) = torch.autograd.grad(inner, d)
            d = (d - o.fixed_point_step * g).detach()
        return d

    def outer_at_fixed_point():
        d = solve()
        with torch.no_grad():
            return float(nn.functional.cross_entropy(net(net_input(clf, perturbed(x, d))), y))

    d_star = solve()
    assert float(d_star.abs().max()) < 0.05          # inside the unclipped region
    grads, _ = hypergradient(clf, params, x, y, carry, d_star, o)
    direct, _ = hypergradient(clf, params, x, y, carry, d_star, Options(implicit=False))
    h = 1e-2
    fd = []
    for p in params:
        flat = torch.zeros(p.numel())
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += h
                up = outer_at_fixed_point()
                p.view(-1)[i] -= 2 * h
                down = outer_at_fixed_point()
                p.view(-1)[i] += h
            flat[i] = (up - down) / (2 * h)
        fd.append(flat.view_as(p))
    full, fdv = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in fd])
    dir_v = torch.cat([g.flatten() for g in direct])
    assert torch.allclose(full, fdv, atol=2e-4, rtol=2e-2), (full, fdv)
    assert (dir_v - fdv).abs().max() > 10 * (full - fdv).abs().max()


@pytest.mark.parametrize("arch,shape", [("gtsrb_cnn", (32, 32, 3)), ("deepid", (55, 47, 3)),
                                        ("small_cnn", (16, 16, 1))])
def test_runs_on_every_architecture(arch, shape):
    torch.manual_seed(0)
    clf = Classifier(build(arch, 5, shape), InputSpec(*shape), 5, arch)
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, (16, *shape), dtype=np.uint8), np.arange(16) % 5, 5)
    given = state(clf)
    model, res = repair("i-bau", clf, DefenderData(clean=data), None, [],
                        {"rounds": 1, "batch_size": 12, "fixed_point_steps": 2})
    assert same(given, state(clf)) and not same(given, state(model))
    assert len(res.details["rounds"]) == 1 and res.passes > 0
    assert all(torch.isfinite(v).all() for v in model.net.state_dict().values()
               if v.is_floating_point())


def test_cli(badnet, tmp_path, capsys):
    clf, data, test, _ = badnet
    save_model(clf, tmp_path / "model.safetensors")
    write_csaw_h5(data.clean, tmp_path / "valid.h5")
    write_csaw_h5(test, tmp_path / "test.h5")
    code = main(["repair", "i-bau", str(tmp_path / "model.safetensors"), "--valid",
                 str(tmp_path / "valid.h5"), "--test", str(tmp_path / "test.h5"), "--out",
                 str(tmp_path / "out"), "--rounds", "1", "--no-implicit"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["method"] == "i-bau" and res["options"]["implicit"] is False
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as e:
        main(["repair", "i-bau", str(tmp_path / "model.safetensors"), "--valid",
              str(tmp_path / "valid.h5"), "--out", str(tmp_path / "bad"), "--norm-bound", "0"])
    assert e.value.code == 2 and "norm-bound" in capsys.readouterr().err
