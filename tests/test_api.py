"""The top-level API names are the functions they claim to be, and they work together."""

from __future__ import annotations

import importlib
import subprocess
import sys

import backdoorlab


def test_every_public_name_is_a_function_even_after_its_module_was_imported():
    # importing a module first used to shadow a top-level name (`backdoorlab.evaluate` was the module)
    for module, _ in backdoorlab._API.values():
        importlib.import_module(module)
    for name in backdoorlab._API:
        assert callable(getattr(backdoorlab, name)) and not isinstance(getattr(backdoorlab, name),
                                                                       type(backdoorlab)), name


def test_import_is_cheap():
    code = "import sys, backdoorlab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.strip() == "False"


def test_evaluate_through_the_api(digits_badnet, tmp_path):
    from backdoorlab import evaluate, load_model, poisoned_sets, save_model

    clf, art, test = digits_badnet
    save_model(clf, tmp_path / "bd.safetensors")
    model = load_model(tmp_path / "bd.safetensors")
    ps, _ = art["poisoned_test"][0]
    res = evaluate(model, test, poisoned_sets([ps]))
    assert res.clean_accuracy > 0.8 and res.asr > 0.9
    assert res.poisoned_sets[0]["rule"].startswith("labels are true labels")
