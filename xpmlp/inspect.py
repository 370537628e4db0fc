"""What a trained network does, class by class: its scores, its confusions, its most
confident mistakes and its first layer's weights.  Everything here returns host NumPy
arrays, whichever backend ran the network.
"""
import numpy as np

from .core.losses import SoftmaxCrossEntropyLoss

NUM_CLASSES = 10
SIDE = 28  # MNIST images are 28x28


def load_model(run_dir, device=None, notice=None, checkpoint="last"):
    """The network of a run directory's last (or best) checkpoint, on ``device`` (default:
    the run's own), ready to evaluate."""
    from . import rundir
    from .backends import get_backend

    config, _ = rundir.load_config(run_dir)
    return rundir.load_model(run_dir, get_backend(device or config.device, notice=notice), config, checkpoint)[0]


def class_probabilities(model, x, chunk=1000):
    """(N, 10) float64 host array: each row the network's belief over the digits.

    Softmax cross-entropy networks: the softmax of the outputs.  Euclidean networks end
    in a Sigmoid trained towards one-hot targets: their outputs divided by their sum.
    """
    be = model.backend
    outputs = []
    for start in range(0, x.shape[0], chunk):
        stop = min(start + chunk, x.shape[0])
        # a copy: with buffered ops forward() returns a buffer the next call overwrites
        outputs.append(np.array(be.to_numpy(model.forward(x[start:stop, ...])), dtype=np.float64))
    out = np.concatenate(outputs)
    if isinstance(model.loss, SoftmaxCrossEntropyLoss):
        out = np.exp(out - out.max(axis=1, keepdims=True))
    total = out.sum(axis=1, keepdims=True)
    return out / np.where(total > 0, total, 1)


def confusion_matrix(labels, predicted, num_classes=NUM_CLASSES):
    """(classes, classes) int64 counts: row = true digit, column = predicted digit."""
    pairs = np.asarray(labels, np.int64) * num_classes + np.asarray(predicted, np.int64)
    return np.bincount(pairs, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def precision_recall(confusion):
    """Per class: precision (of the predictions of that digit, the share right) and recall
    (of the images of that digit, the share found); NaN where there is nothing to divide."""
    confusion = np.asarray(confusion, np.float64)
    hits = np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / confusion.sum(axis=0), hits / confusion.sum(axis=1)


def confident_mistakes(probabilities, labels, count=25):
    """Indices of the wrongly predicted images, most confident first (at most ``count``)."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != np.asarray(labels))
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:count]]


def _linear_layers(model):
    from .core.layers import Linear
    return [layer for layer in model.layers if isinstance(layer, Linear)]


def hidden_layers(model):
    return len(_linear_layers(model)) - 1


def first_layer_images(model, count=64):
    """(units, 28, 28) host array: the first Linear layer's incoming weights of each of
    its first ``count`` units (for a network without hidden layers: the ten class templates)."""
    first = _linear_layers(model)[0]
    W = np.array(model.backend.to_numpy(first.W), dtype=np.float64)  # (784, units)
    units = min(count, W.shape[-1])
    return W[:, :units].T.reshape(units, SIDE, SIDE)


class Predictions:
    """One network's predictions on a labelled set: probabilities, arg-max and confusions."""

    def __init__(self, model, x, labels):
        self.labels = np.asarray(labels)
        self.probabilities = class_probabilities(model, x)
        self.predicted = self.probabilities.argmax(axis=1)
        self.confusion = confusion_matrix(self.labels, self.predicted)
        self.precision, self.recall = precision_recall(self.confusion)

    def per_class(self):
        """JSON-ready per-class figures (None for an undefined precision)."""
        def clean(values):
            return [None if np.isnan(v) else float(v) for v in values]
        return {"precision": clean(self.precision), "recall": clean(self.recall),
                "count": self.confusion.sum(axis=1).tolist()}
