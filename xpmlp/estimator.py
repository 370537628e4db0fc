"""``MLPClassifier``: xpmlp's networks behind scikit-learn's estimator interface.

NumPy arrays in, NumPy arrays out, whichever device trains.  Training is the project's one
epoch loop (training/loop.py) with in-memory hooks: no run directory, no checkpoint files.
Needs scikit-learn (``pip install 'xpmlp[sklearn]'``) for its base classes and input checks.
"""
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .config import TrainConfig, TrainError
from .data import Dataset
from .inspect import class_probabilities
from .training.loop import EpochLoop


class _Never:
    stop = False  # Ctrl-C in a notebook raises KeyboardInterrupt as anywhere else


class _MemoryLoop(EpochLoop):
    """The epoch loop with hooks that keep each epoch's record in memory."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, progress=False, log=_quiet, stop_flag=_Never(), **kwargs)
        self.history = []

    def _checkpoint(self, rng_states, pos=0, partial_time_s=0.0, partial=None):
        pass

    def _write_epoch(self, k, iter_records, record):
        self.history.append(record)

    def _on_diverged(self, k, record):
        warnings.warn(f"MLPClassifier: training diverged (non-finite loss) in epoch {record['epoch']}; "
                      "try a smaller lr", RuntimeWarning, stacklevel=4)

    def _line(self, epoch, active, records, diverged):
        return ""

    def _where_saved(self):
        return ""

    def _finish(self, last):
        return last[0]


def _quiet(line):
    pass


class MLPClassifier(ClassifierMixin, BaseEstimator):
    """A multi-layer perceptron trained by SGD with momentum, as ``xpmlp train`` trains one.

    ``hidden``: the hidden layers' sizes; ``activation``: relu or sigmoid; ``loss``: sce
    (softmax cross-entropy) or mse (Euclidean, sigmoid outputs); ``epochs`` passes of
    shuffled mini-batches of ``batch_size`` (at most the number of samples); ``lr``,
    ``momentum``, ``weight_decay``, ``init_std`` (of the initial weights) and ``seed`` (weights
    and shuffles) as the command line's flags; ``device``: cpu, numpy, cuda, cuda:N or auto.
    Features are used as given: scale them (e.g. StandardScaler) as for any MLP."""

    def __init__(self, hidden=(100,), activation="relu", loss="sce", epochs=50, batch_size=32, lr=0.05,
                 momentum=0.9, weight_decay=5e-4, init_std=0.1, seed=0, dtype="float32", device="cpu"):
        self.hidden, self.activation, self.loss = hidden, activation, loss
        self.epochs, self.batch_size, self.lr, self.momentum = epochs, batch_size, lr, momentum
        self.weight_decay, self.init_std, self.seed = weight_decay, init_std, seed
        self.dtype, self.device = dtype, device

    # -- training

    def fit(self, X, y):
        """Train a new network on (X, y) for ``epochs`` epochs."""
        X, y = self._check_xy(X, y, reset=True)
        self.classes_ = np.unique(y)
        self._start(X, len(self.classes_))
        return self._train(X, y, self.epochs)

    def partial_fit(self, X, y, classes=None):
        """One more epoch on (X, y); the first call needs ``classes`` (all the labels there
        will be) unless this batch has every one of them."""
        first = not hasattr(self, "classes_")
        X, y = self._check_xy(X, y, reset=first)
        if first:
            self.classes_ = np.unique(y if classes is None else classes)
            self._start(X, len(self.classes_))
        elif classes is not None and not np.array_equal(np.unique(classes), self.classes_):
            raise ValueError(f"classes {np.unique(classes)} differ from the first call's {self.classes_}")
        return self._train(X, y, self._loop.state["epoch"] + 1)

    def _check_xy(self, X, y, reset):
        X, y = validate_data(self, X, y, reset=reset, dtype=(np.float64, np.float32))
        check_classification_targets(y)
        return X, y

    def _config(self, n_samples, n_features, classes):
        hidden = list(self.hidden) if np.ndim(self.hidden) else [self.hidden]
        try:
            return TrainConfig(hidden=[int(h) for h in hidden], activation=self.activation, loss=self.loss,
                               epochs=max(int(self.epochs), 1), batch_size=min(int(self.batch_size), n_samples),
                               lr=float(self.lr), momentum=float(self.momentum),
                               weight_decay=float(self.weight_decay), init_std=float(self.init_std),
                               seed=int(self.seed), dtype=self.dtype, device=self.device,
                               in_features=n_features, classes=max(classes, 2),
                               data="(arrays)").validate()  # data: not a known dataset's fixed size
        except (TrainError, TypeError, ValueError) as exc:
            raise ValueError(f"MLPClassifier: {exc}") from None

    def _start(self, X, classes):
        if classes < 2:
            raise ValueError(f"MLPClassifier needs samples of at least 2 classes; got 1 class: {self.classes_[0]}")
        from .backends import get_backend

        config = self._config(*X.shape, classes)
        backend = get_backend(config.device)
        model = config.build(backend)
        optimizer = config.optimizer(model)
        self._loop = _MemoryLoop(config, model, optimizer, None, seeds=[config.seed])
        self.loss_curve_ = []

    def _train(self, X, y, epochs):
        loop = self._loop
        if X.shape[0] < loop.config.batch_size:
            raise ValueError(f"MLPClassifier: {X.shape[0]} samples, fewer than the batch size "
                             f"{loop.config.batch_size} of the first fit")
        labels = np.searchsorted(self.classes_, y)
        if not np.array_equal(self.classes_[np.minimum(labels, len(self.classes_) - 1)], y):
            raise ValueError(f"y holds labels not among classes {self.classes_}")
        x = np.asarray(X, dtype=np.float32 if loop.config.dtype == "float32" else np.float64)
        loop.data = Dataset(x, labels.astype(np.int64), x[:0], labels[:0].astype(np.int64))
        loop.config.epochs = epochs
        loop._loop()
        self.loss_curve_ = [r["train_loss"] for r in loop.history]
        self.n_iter_ = loop.state["epoch"]
        return self

    # -- using it

    def predict_proba(self, X):
        """(n_samples, n_classes) NumPy array: the network's probability of each class."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        model = self._loop.model
        probs = class_probabilities(model, model.backend.asarray(X, dtype=model.dtype))
        return probs[:, :len(self.classes_)]

    def predict(self, X):
        """(n_samples,) NumPy array of ``classes_``: the most probable class of each sample."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def __sklearn_is_fitted__(self):
        return hasattr(self, "_loop")

    # -- pickling: weights and optimiser state as host arrays, rebuilt on the same device

    def __getstate__(self):
        state = dict(self.__dict__)
        loop = state.pop("_loop", None)
        if loop is not None:
            be = loop.backend
            state["_saved"] = dict(config=loop.config, params=[np.array(a) for a in loop.model.state_arrays()],
                                   velocity=[np.array(be.to_numpy(v)) for v in loop.optimizer.state()],
                                   rng=loop.rngs[0].bit_generator.state, state=dict(loop.state),
                                   history=list(loop.history))
        return state

    def __setstate__(self, state):
        saved = state.pop("_saved", None)
        self.__dict__.update(state)
        if saved is not None:
            from .backends import get_backend
    
            config = saved["config"]
            backend = get_backend(config.device)
            model = config.build(backend)
            model.load_state_arrays(saved["params"])
            optimizer = config.optimizer(model)
            optimizer.load_state([backend.asarray(v, dtype=model.dtype) for v in saved["velocity"]])
            self._loop = _MemoryLoop(config, model, optimizer, None, seeds=[config.seed])
            self._loop.rngs[0].bit_generator.state = saved["rng"]
            self._loop.state.update(saved["state"])
            self._loop.history = saved["history"]
