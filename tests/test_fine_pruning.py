"""Fine-Pruning and magnitude pruning on a small BadNets model trained on the embedded digits."""

import numpy as np
import pytest
import torch

from backdoorlab.defenses.fine_pruning import fine_prune
from backdoorlab.defenses.magnitude_pruning import kernels, magnitude_masks, magnitude_prune
from backdoorlab.errors import BadInput
from backdoorlab.train import TrainConfig


@pytest.fixture(scope="module")
def badnet(digits_badnet):
    clf, art, test = digits_badnet
    return clf, art["valid"], test, art["poisoned_test"][0][0]


def test_fine_prune_keeps_pruned_channels_zero_and_reports_stages(badnet):
    clf, valid, test, ps = badnet
    cfg = TrainConfig(epochs=3, lr=5e-4, batch_size=32, schedule="none", seed=0)
    pruned, tuned, res = fine_prune(clf, valid, test, ps, layer="conv_2", drop=None, fraction=0.5, cfg=cfg)
    assert len(res.pruned_channels) == 16 and res.num_channels == 32
    assert res.before.asr > 0.9
    for model in (pruned, tuned):
        w = model.layer("conv_2").weight.detach()
        assert torch.all(w[res.pruned_channels] == 0)
        act = model.activations(valid.images[:50], "conv_2")
        assert np.all(act[:, res.pruned_channels] == 0)
    # fine-tuning changed the kept weights, the original model is untouched
    kept = [c for c in range(32) if c not in res.pruned_channels]
    assert not torch.equal(tuned.layer("conv_2").weight[kept], pruned.layer("conv_2").weight[kept])
    before = torch.count_nonzero(clf.layer("conv_2").weight)
    assert before > torch.count_nonzero(pruned.layer("conv_2").weight)
    assert res.after_finetuning.valid_accuracy >= res.after_pruning.valid_accuracy - 0.02
    assert res.settings["tune_images"] + res.settings["select_images"] == len(valid)


def test_fine_prune_by_drop_uses_the_threshold(badnet):
    clf, valid, test, ps = badnet
    cfg = TrainConfig(epochs=1, lr=1e-4, batch_size=32, schedule="none")
    _, _, res = fine_prune(clf, valid, drop=10.0, cfg=cfg)
    assert res.layer == "conv_2" and 0 < len(res.pruned_channels) <= 32
    assert res.before.valid_accuracy - res.after_pruning.valid_accuracy >= 0.10 - 1e-9 or \
        len(res.pruned_channels) == 32
    with pytest.raises(BadInput):
        fine_prune(clf, valid, drop=4.0, fraction=0.5)


def test_magnitude_masks_hit_the_sparsity_exactly(badnet):
    clf = badnet[0]
    for scope in ("global", "layer"):
        masks = magnitude_masks(clf.net, 0.7, scope)
        total = sum(m.numel() for m in masks)
        assert abs(sum(int((~m).sum()) for m in masks) - round(0.7 * total)) <= len(masks)
        # the pruned weights are the small ones: across every kernel for the global cut, inside
        # each kernel for the per-layer one
        pairs = list(zip(kernels(clf.net), masks, strict=True))
        if scope == "global":
            pruned = torch.cat([w[~m].abs().flatten() for w, m in pairs])
            kept = torch.cat([w[m].abs().flatten() for w, m in pairs])
            assert pruned.numel() and kept.numel() and pruned.max() <= kept.min()
        else:
            for w, m in pairs:
                if (~m).any() and m.any():
                    assert w[~m].abs().max() <= w[m].abs().min() + 1e-12


def test_magnitude_prune_keeps_zeros_through_finetuning(badnet):
    clf, valid, test, ps = badnet
    cfg = TrainConfig(epochs=2, lr=5e-4, batch_size=32, schedule="none")
    pruned, tuned, res = magnitude_prune(clf, valid, test, ps, sparsity=0.6, cfg=cfg)
    zeros = sum(int((w == 0).sum()) for w in kernels(tuned.net))
    assert zeros >= res.pruned_weights
    assert res.pruned_weights == pytest.approx(0.6 * res.total_weights, abs=2)
    assert res.before.asr is not None and res.after_finetuning.asr is not None


def test_fine_prune_cli(tmp_path, badnet, capsys):
    import json

    from backdoorlab.cli import main
    from backdoorlab.data.csaw import write_csaw_h5
    from backdoorlab.models import load_model, save_model

    clf, valid, test, ps = badnet
    save_model(clf, tmp_path / "m.safetensors")
    write_csaw_h5(valid, tmp_path / "v.h5")
    write_csaw_h5(test, tmp_path / "t.h5")
    write_csaw_h5(ps, tmp_path / "p.h5")
    out = tmp_path / "fp"
    args = ["fine-prune", str(tmp_path / "m.safetensors"), "--valid", str(tmp_path / "v.h5"), "--test",
            str(tmp_path / "t.h5"), "--poisoned", str(tmp_path / "p.h5"), "--epochs", "1", "--out", str(out)]
    assert main(args + ["--fraction", "0.25"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "fine-prune" and len(res["pruned_channels"]) == 8
    assert res["before"]["asr"] == pytest.approx(badnet_asr(clf, ps))
    tuned = load_model(out / "finetuned.safetensors")
    assert np.all(tuned.activations(valid.images[:20], "conv_2")[:, res["pruned_channels"]] == 0)
    capsys.readouterr()
    assert main(args[:-1] + [str(tmp_path / "bad"), "--fraction", "0.5", "--drop", "3"]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(args[:-1] + [str(tmp_path / "bad"), "--layer", "conv_9"]) == 2
    assert "unknown layer" in capsys.readouterr().err


def badnet_asr(clf, ps):
    keep = ps.labels != ps.meta["targets"]
    return float((clf.predict(ps.images[keep]) == ps.meta["targets"][keep]).mean())
