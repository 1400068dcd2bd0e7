"""GoodNet: the agree/disagree rule, files, metrics."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from backdoorlab.data import ImageSet
from backdoorlab.defenses.goodnet import (
    GoodNet,
    goodnet_metrics,
    goodnet_predictions,
    make_goodnet,
)
from backdoorlab.defenses.masking import apply_channel_mask, mask_from_channels
from backdoorlab.errors import BadInput
from backdoorlab.models import Classifier, InputSpec, load_model, save_model
from backdoorlab.models.architectures import small_cnn


class Table(nn.Module):
    """A 'network' answering fixed logits: input pixel value i (1x1 image, raw scale) -> row i."""

    def __init__(self, rows: list[list[float]]):
        super().__init__()
        self.register_buffer("table", torch.tensor(rows, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.reshape(len(x)).long()]


def table_clf(rows) -> Classifier:
    return Classifier(Table(rows), InputSpec(1, 1, 1, scale="raw"), len(rows[0]), "table")


def pixels(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint8).reshape(-1, 1, 1, 1)


def test_rule_on_constructed_cases():
    bad = table_clf([[5, 0, 0], [0, 9, 0], [1, 2, 3], [0, 0, 1e30], [-1e30, 0, -5]])
    rep = table_clf([[4, 1, 0], [7, 0, 0], [0, 0, 8], [1e30, -1e30, 0], [-2e30, -1e31, -3e30]])
    g = make_goodnet(bad, rep)
    assert g.num_classes == 4 and g.arch == "goodnet"
    x = pixels(0, 1, 2, 3, 4)
    # row 0: both say 0 -> 0; row 1: B 1, B' 0 -> 3 (backdoor); row 2: both 2 -> 2;
    # row 3: B 2, B' 0 with huge logits -> 3; row 4: B 1, B' 0 -> 3
    assert g.predict(x).tolist() == [0, 3, 2, 3, 3]
    logits = g.logits(x)
    assert np.isfinite(logits).all()
    np.testing.assert_array_equal(logits[:, :3], rep.logits(x))  # B' logits pass through
    np.testing.assert_array_equal(goodnet_predictions(bad.predict(x), rep.predict(x), 3), [0, 3, 2, 3, 3])


def test_agreement_with_huge_negative_logits_keeps_the_class():
    bad = table_clf([[-1e30, -2e30], [3, 2]])
    rep = table_clf([[-1e30, -3e30], [1, 0]])
    assert make_goodnet(bad, rep).predict(pixels(0, 1)).tolist() == [0, 0]


def _small(seed: int) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(small_cnn(5, (16, 16, 1)), InputSpec(16, 16, 1), 5, "small_cnn")


def test_save_load_round_trip(tmp_path):
    bad = _small(0)
    rep = apply_channel_mask(bad, None, mask_from_channels(32, range(0, 32, 2)))
    g = make_goodnet(bad, rep)
    x = np.random.default_rng(0).integers(0, 256, size=(40, 16, 16, 1), dtype=np.uint8)
    save_model(g, tmp_path / "g.safetensors")
    back = load_model(tmp_path / "g.safetensors")
    assert back.arch == "goodnet" and back.num_classes == 6
    assert back.arch_options["bad"]["arch"] == "small_cnn"
    np.testing.assert_array_equal(back.logits(x), g.logits(x))
    assert isinstance(back.net, GoodNet)
    # the rule holds on the reloaded file too
    pb, pr = bad.predict(x), rep.predict(x)
    np.testing.assert_array_equal(back.predict(x), goodnet_predictions(pb, pr, 5))


def test_loading_needs_no_prior_import(tmp_path):
    g = make_goodnet(_small(0), _small(1))
    save_model(g, tmp_path / "g.safetensors")
    code = ("from backdoorlab.models import load_model; "
            f"m = load_model({str(tmp_path / 'g.safetensors')!r}); print(m.arch, m.num_classes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["goodnet", "6"]


def test_mismatched_networks_are_refused(tmp_path):
    bad = _small(0)
    with pytest.raises(BadInput, match="different inputs"):
        make_goodnet(bad, bad.with_scale("raw"))
    other = Classifier(small_cnn(7, (16, 16, 1)), InputSpec(16, 16, 1), 7, "small_cnn")
    with pytest.raises(BadInput, match="classes"):
        make_goodnet(bad, other)
    # a sidecar whose class count does not fit is refused on load
    import json

    save_model(make_goodnet(bad, bad), tmp_path / "g.safetensors")
    meta = json.loads((tmp_path / "g.json").read_text())
    meta["num_classes"] = 5
    (tmp_path / "g.json").write_text(json.dumps(meta))
    with pytest.raises(BadInput, match="class counts"):
        load_model(tmp_path / "g.safetensors")


def test_metrics():
    # B: pixel 0..3 -> class = pixel % 3 ; B' agrees except on pixels 2 and 3
    bad = table_clf([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    rep = table_clf([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    g = make_goodnet(bad, rep)
    clean = ImageSet(pixels(0, 1, 0, 1), np.array([0, 1, 1, 1]), 3)  # G: 0, 1, 0, 1 -> 3/4 right
    poisoned = ImageSet(pixels(2, 3, 0, 0, 1), np.array([1, 1, 2, 0, 2]), 3)
    m = goodnet_metrics(g, clean, poisoned, target=0)
    assert m.clean_accuracy == 0.75 and m.clean_flagged == 0.0 and m.backdoor_class == 3
    # label-0 row excluded: G on pixels 2, 3, 0, 1 -> 3, 3, 0, 1
    assert m.poisoned_count == 4
    assert m.asr == 0.25 and m.detection_rate == 0.5
    with pytest.raises(BadInput, match="target"):
        goodnet_metrics(g, clean, poisoned)
    with pytest.raises(BadInput, match="out of range"):
        goodnet_metrics(g, ImageSet(pixels(0), np.array([3]), 4), None)
