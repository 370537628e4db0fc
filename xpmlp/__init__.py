"""xpmlp: hand-written MLP layers, losses and SGD over an array namespace (NumPy, CuPy or
PyTorch tensors)."""
from .backends import Backend, BackendUnavailable, available_backends, get_backend
from .core.layers import Linear, ReLU, Sigmoid
from .core.losses import EuclideanLoss, SoftmaxCrossEntropyLoss
from .core.model import MODELS, Sequential, accuracy, build_mlp, build_model
from .core.optim import SGD

__version__ = "0.1.0"


def __getattr__(name):
    # Imported when first used: the estimator needs scikit-learn, which ``import xpmlp`` must not.
    if name == "MLPClassifier":
        from .estimator import MLPClassifier
        return MLPClassifier
    if name == "load":
        from .saved import load
        return load
    raise AttributeError(f"module 'xpmlp' has no attribute {name!r}")


__all__ = ["MLPClassifier", "load", "Backend", "BackendUnavailable", "EuclideanLoss", "Linear", "MODELS", "ReLU", "SGD",
           "Sequential", "Sigmoid", "SoftmaxCrossEntropyLoss", "accuracy", "available_backends",
           "build_mlp", "build_model", "get_backend"]
