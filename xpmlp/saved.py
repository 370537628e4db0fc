"""A trained run in your own code: ``xpmlp.load(run_dir)`` (a model that predicts on NumPy
arrays) and ``export`` (its weights and biases in an .npz that NumPy alone can read)."""
import numpy as np

from . import rundir
from .data import as_inputs


class TrainedModel:
    """A run's network, on ``device``.  ``predict_proba(X)`` / ``predict(X)`` take samples as
    the run's data held them (8-bit images are scaled as in training; any other numbers are
    used as they are) and return host NumPy arrays; the classes are 0 .. classes-1."""

    def __init__(self, model, config, data_info):
        self.model, self.config, self.data_info = model, config, data_info
        self.classes_ = np.arange(config.classes)
        self.n_features_in_ = config.in_features

    def predict_proba(self, X):
        from .inspect import class_probabilities
        x = as_inputs(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {x.shape[1]} features per sample; the network takes {self.n_features_in_}")
        return class_probabilities(self.model, self.model.backend.asarray(x, dtype=self.model.dtype))

    def predict(self, X):
        return np.argmax(self.predict_proba(X), axis=1)

    def __repr__(self):
        return f"TrainedModel({self.config.name}, {self.n_features_in_} features, {self.config.classes} classes)"


def load(run_dir, device="cpu", checkpoint="last"):
    """The network of ``run_dir``'s last checkpoint (or ``checkpoint="best"``: the best
    validation accuracy's, for a run trained with --val) on ``device`` (default: cpu)."""
    from .backends import get_backend

    config, saved = rundir.load_config(run_dir)
    model, _ = rundir.load_model(run_dir, get_backend(device), config, checkpoint)
    return TrainedModel(model, config, saved.get("data_info"))


def export(run_dir, out):
    """Write ``out`` (.npz): W0, b0, W1, b1, ... (W of shape (inputs, outputs): a layer is
    x @ W + b), ``activation`` between layers (relu or sigmoid), ``output`` (softmax or
    sigmoid: what turns the last layer into class scores), ``input_scaling`` and ``classes``.
    Returns the names and shapes written."""
    from .core.model import MODELS

    trained = load(run_dir)
    c = trained.config
    hidden, activation, loss = MODELS[c.model] if c.hidden is None else (c.hidden, c.activation, c.loss)
    params = trained.model.state_arrays()  # W, b of each Linear layer in turn
    arrays = {f"{'Wb'[i % 2]}{i // 2}": np.asarray(a) for i, a in enumerate(params)}
    info = trained.data_info or {"scaling": "(pixel - 128) / 255"}  # a run from before data was recorded: MNIST
    arrays.update(activation=np.array(activation if hidden else "none"),
                  output=np.array("softmax" if loss == "sce" else "sigmoid"),
                  input_scaling=np.array(info["scaling"]), classes=np.array(c.classes))
    rundir.atomic_write(out, lambda f: np.savez(f, **arrays))
    return {k: v.shape for k, v in arrays.items()}
