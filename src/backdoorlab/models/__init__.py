"""Models: architectures, `Classifier`, `InputSpec`, model files and Keras HDF5 import."""

from backdoorlab.models.architectures import ARCHITECTURES, build
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.files import load_model, save_model
from backdoorlab.models.spec import InputSpec

__all__ = ["ARCHITECTURES", "Classifier", "InputSpec", "build", "load_model", "save_model"]
