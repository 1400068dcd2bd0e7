"""backdoorlab: neural-network backdoor attacks and defenses, CPU first.

The public API in one place (each name is the function it says; torch loads on first use)::

    from backdoorlab import load_model, load_dataset, evaluate, poisoned_sets
    from backdoorlab import prune_sweep, fine_prune, make_goodnet, neural_cleanse, nc_mitigate
"""

from backdoorlab.errors import BadInput

__version__ = "0.1.0"

# public name -> (module, attribute); lazy, to keep `import backdoorlab` cheap (no torch at import)
_API = {
    "load_dataset": ("backdoorlab.data", "load_dataset"),
    "load_model": ("backdoorlab.models.files", "load_model"),
    "save_model": ("backdoorlab.models.files", "save_model"),
    "save_keras_weights": ("backdoorlab.models.keras_h5", "save_keras_weights"),
    "evaluate": ("backdoorlab.evaluation", "evaluate"),
    "poisoned_sets": ("backdoorlab.poisoned", "poisoned_sets"),
    "train_attack": ("backdoorlab.attacks.runner", "train_attack"),
    "prune_sweep": ("backdoorlab.defenses.pruning", "prune_sweep"),
    "fine_prune": ("backdoorlab.defenses.fine_pruning", "fine_prune"),
    "make_goodnet": ("backdoorlab.defenses.goodnet", "make_goodnet"),
    "neural_cleanse": ("backdoorlab.defenses.neural_cleanse", "neural_cleanse"),
    "nc_mitigate": ("backdoorlab.defenses.nc_mitigation", "mitigate"),
    "repair": ("backdoorlab.repairs", "repair"),
    "detect": ("backdoorlab.detectors", "detect"),
    "methods": ("backdoorlab.registry", "methods"),
}

__all__ = ["BadInput", "__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'backdoorlab' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value
