"""docs/adding-a-method.md: its example repair, installed as one new module of
`backdoorlab.repairs` and nothing else, shows in `list`, runs through `repair` and `run`, and gets
its report section."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from backdoorlab import registry
from backdoorlab.cli import main
from backdoorlab.experiment.run import run_experiment

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The doc's python block as a method file in a folder named by $BACKDOORLAB_METHODS (the way
    to add a method without touching the source tree; a file in src/backdoorlab/repairs/ is found
    the same way)."""
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(code) == 1
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "fine_tune.py").write_text(code[0])
    monkeypatch.setenv(registry.PLUGINS_ENV, str(plugin))  # worker processes inherit it
    monkeypatch.setattr(registry, "_loaded", set())
    yield
    registry._METHODS.pop("fine-tune", None)
    sys.modules.pop("backdoorlab_methods.fine_tune", None)


def test_the_documented_repair_is_one_file_that_appears_everywhere(installed, tmp_path, capsys):
    assert main(["list", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["fine-tune"]["family"] == "repair" and "BackdoorBench" in listed["fine-tune"]["paper"]
    assert [o["name"] for o in listed["fine-tune"]["options"]] == ["epochs", "lr", "batch_size",
                                                                   "select_fraction", "seed"]
    toml = tmp_path / "exp.toml"
    toml.write_text("""
seeds = [0]
[data]
source = "digits"
test_fraction = 0.25
[model]
arch = "small_cnn"
[train]
epochs = 3
batch_size = 64
lr = 3e-3
[[attack]]
name = "badnets"
trigger = "patch:size=3"
target = 0
rate = 0.1
[[defense]]
name = "ft"
kind = "fine-tune"
epochs = [1, 2]
""")
    res = run_experiment(toml, tmp_path / "out", jobs=1, threads=1, report=True)
    assert res["errors"] == []
    rows = {r[1]: r for r in res["table"]["rows"]}
    assert set(rows) == {"none", "ft-epochs1", "ft-epochs2"}
    assert rows["ft-epochs2"][-1].startswith("fine-tuned 2 epochs")
    assert "## Repair fine-tune: badnets × " in (tmp_path / "out" / "report.md").read_text()
    # the CLI: its options are flags, bounds checked by argparse
    cell = next(c for c in res["cells"] if c["cell"]["kind"] == "attack")
    d = tmp_path / "out" / "cells" / cell["dir"]
    code = main(["repair", "fine-tune", str(d / "model.safetensors"), "--valid", str(d / "clean_valid.h5"),
                 "--test", str(d / "clean_test.h5"), "--poisoned", str(d / "poisoned_test.h5"),
                 "--epochs", "1", "--out", str(tmp_path / "ft")])
    assert code == 0
    r = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert r["method"] == "fine-tune" and r["options"]["epochs"] == 1 and r["cost"]["image_passes"] > 0
    with pytest.raises(SystemExit):
        main(["repair", "fine-tune", "m", "--valid", "v", "--epochs", "0", "--out", str(tmp_path / "x")])
