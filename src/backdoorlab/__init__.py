"""backdoorlab: neural-network backdoor attacks and defenses, CPU first.

The public API in one place::

    from backdoorlab import load_dataset, load_model, evaluate
"""

from backdoorlab.errors import BadInput

__version__ = "0.1.0"

__all__ = ["BadInput", "__version__", "load_dataset", "load_model", "save_model", "evaluate"]


def __getattr__(name: str):  # lazy: keep `import backdoorlab` cheap (no torch at import)
    if name == "load_dataset":
        from backdoorlab.data import load_dataset

        return load_dataset
    if name in ("load_model", "save_model"):
        from backdoorlab.models import files

        return getattr(files, name)
    if name == "evaluate":
        from backdoorlab.evaluate import evaluate

        return evaluate
    raise AttributeError(name)
