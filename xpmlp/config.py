"""A training run's settings (``TrainConfig``) and their checks.

Kept apart from the training loop so that the CLI and the sweep can validate settings
without importing it.  The names of models, activations, losses and dtypes come from
``model.py``, where the builder defines them.
"""
import dataclasses
import math
import os

import numpy as np

from .core.model import ACTIVATIONS, DTYPES, LOSSES, MODELS, build_mlp
from .core.optim import SGD

# Settings that define the trajectory: a resume must not contradict them.
TRAJECTORY_KEYS = ("model", "hidden", "activation", "loss", "batch_size", "lr", "momentum",
                   "weight_decay", "init_std", "seed", "dtype", "val", "lr_schedule")
# The datasets known by name (data.KNOWN says where they come from and their sums).
DATASETS = ("mnist", "fashion-mnist", "kmnist")


class TrainError(Exception):
    """A user-facing problem with the run (bad settings, unusable directory): one line."""


def one_of(names):
    """'a or b', 'a, b or c': the choices in a message."""
    names = list(names)
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


@dataclasses.dataclass
class TrainConfig:
    model: str = "mlp2-relu-sce"
    hidden: list | None = None       # with activation and loss: a custom MLP instead of a named one
    activation: str | None = None
    loss: str | None = None
    epochs: int = 100
    batch_size: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    init_std: float = 0.01
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    data_dir: str | None = None
    dataset: str = "mnist"           # a dataset known by name (data.KNOWN), downloaded and verified
    data: str | None = None          # or a user's own: a directory of IDX files or an .npz
    in_features: int = 784           # the data's, set from it (data.Dataset.info)
    classes: int = 10
    val: int | float | None = None   # held out of the training set: N samples, or a fraction in (0, 1)
    lr_schedule: str | None = None   # None: lr throughout; "step:EPOCHS:FACTOR" or "cosine" (lr_at)
    eval_every: int = 1
    checkpoint_every: int = 1
    log_every: int = 1
    tensorboard: bool = False

    def validate(self):
        _check_types(self)
        if self.hidden is None and self.model not in MODELS:
            raise TrainError(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS)}")
        if self.hidden is not None:
            if self.activation not in ACTIVATIONS and self.hidden:
                raise TrainError(f"--activation must be {one_of(ACTIVATIONS)}")
            if self.loss not in LOSSES:
                raise TrainError(f"--loss must be {one_of(LOSSES)}")
            if any(h <= 0 for h in self.hidden):
                raise TrainError("--hidden sizes must be positive")
        for name in ("epochs", "batch_size", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise TrainError(f"--lr must be a positive number, got {self.lr}")
        parse_schedule(self.lr_schedule)
        if not 0 <= self.momentum <= 1:
            raise TrainError(f"--momentum must be in [0, 1], got {self.momentum}")
        if not self.weight_decay >= 0:
            raise TrainError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not self.init_std > 0:
            raise TrainError(f"--init-std must be positive, got {self.init_std}")
        if self.dtype not in DTYPES:
            raise TrainError(f"--dtype must be {one_of(DTYPES)}, got {self.dtype!r}")
        if self.dataset not in DATASETS:
            raise TrainError(f"--dataset must be {one_of(DATASETS)}, got {self.dataset!r}")
        if self.in_features <= 0 or self.classes < 2:
            raise TrainError(f"in_features must be positive and classes at least 2, got {self.in_features}, "
                             f"{self.classes}")
        if self.val is not None and not (isinstance(self.val, int) and self.val >= 1 or
                                         isinstance(self.val, float) and 0 < self.val < 1):
            raise TrainError(f"--val must be a number of samples (1 or more) or a fraction in (0, 1), got {self.val}")
        if self.data is None and self.batch_size > 60000:  # the known datasets' size; one's own: fit_data
            raise TrainError(f"--batch-size {self.batch_size} exceeds the 60000 training images")
        if self.seed < 0:
            raise TrainError(f"--seed must be >= 0, got {self.seed}")
        _check_memory(self)
        return self

    @property
    def widths(self):
        """The sizes of every layer's output, input included: [784, *hidden, 10] on MNIST."""
        hidden = MODELS[self.model][0] if self.hidden is None else self.hidden
        return [self.in_features, *hidden, self.classes]

    def fit_data(self, data):
        """These settings with the input width and classes of ``data`` (a data.Dataset),
        checked against its size."""
        info, n = getattr(data, "info", None), len(data.train_x)  # n: after the validation split
        if self.batch_size > n:
            held = f" (after the {len(data.val_x)} held out by --val)" if getattr(data, "val_x", None) is not None \
                else ""
            raise TrainError(f"--batch-size {self.batch_size} exceeds the {n} training samples{held}")
        if info is None:  # arrays made by hand (Dataset(...) without info): as the settings say
            return self
        return dataclasses.replace(self, in_features=info["train"][1], classes=info["classes"])

    @property
    def name(self):
        if self.hidden is None:
            return self.model
        return f"mlp{'-'.join(map(str, self.hidden)) or '0'}-{self.activation}-{self.loss}"

    def build(self, backend, **options):
        """The model these settings describe, on ``backend``; ``options`` go to the builder."""
        common = dict(backend=backend, dtype=self.dtype, init_std=self.init_std, seed=self.seed,
                      in_features=self.in_features, num_classes=self.classes, **options)
        hidden, activation, loss = MODELS[self.model] if self.hidden is None else \
            (self.hidden, self.activation, self.loss)
        return build_mlp(hidden, activation, loss, **common)

    def optimizer(self, model):
        """The SGD these settings describe, for ``model``."""
        return SGD(model, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    @classmethod
    def from_saved(cls, saved):
        """The config of a saved config.json (its extra keys, e.g. versions, ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in saved.items() if k in fields})
        if config.hidden is not None:  # the saved "model" is a name derived from hidden/activation/loss
            config.model = cls.model
        return config


def parse_schedule(text):
    """("step", EPOCHS, FACTOR), ("cosine",) or None (a constant rate) of --lr-schedule's text."""
    if text is None:
        return None
    if text == "cosine":
        return ("cosine",)
    kind, *rest = text.split(":")
    try:
        every, factor = int(rest[0]), float(rest[1])
        ok = kind == "step" and len(rest) == 2 and every > 0 and 0 < factor <= 1
    except (ValueError, IndexError):
        ok = False
    if not ok:
        raise TrainError(f"--lr-schedule must be step:EPOCHS:FACTOR (EPOCHS a positive integer, FACTOR in (0, 1]) "
                         f"or cosine, got {text!r}")
    return ("step", every, factor)


def lr_at(config, epoch):
    """The learning rate of epoch ``epoch`` (1, 2, ...): ``lr`` times FACTOR once every EPOCHS
    epochs (step), or annealed from ``lr`` towards 0 over ``epochs`` by half a cosine."""
    schedule = parse_schedule(config.lr_schedule)
    if schedule is None:
        return config.lr
    if schedule[0] == "step":
        return config.lr * schedule[2] ** ((epoch - 1) // schedule[1])
    return config.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))


# What each setting must be: TOML, config.json and the Python API do not go through argparse.
_INTEGER = ("epochs", "batch_size", "seed", "eval_every", "checkpoint_every", "log_every", "in_features", "classes")
_NUMBER = ("lr", "momentum", "weight_decay", "init_std")
_TEXT = ("model", "dtype", "device", "dataset")
_TEXT_OR_NONE = ("activation", "loss", "data_dir", "data", "lr_schedule")


def _check_types(config):
    def fail(name, kind):
        raise TrainError(f"--{name.replace('_', '-')} must be {kind}, got {getattr(config, name)!r}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for name in _INTEGER:
        if not is_int(getattr(config, name)):
            fail(name, "an integer")
    for name in _NUMBER:
        value = getattr(config, name)
        if not (is_int(value) or isinstance(value, float)):
            fail(name, "a number")
    for name in _TEXT + _TEXT_OR_NONE:
        value = getattr(config, name)
        if not isinstance(value, str) and not (value is None and name in _TEXT_OR_NONE):
            fail(name, "a string")
    if config.val is not None and not (is_int(config.val) or isinstance(config.val, float)):
        fail("val", "a number of samples or a fraction")
    if config.hidden is not None and not (isinstance(config.hidden, list) and all(map(is_int, config.hidden))):
        fail("hidden", "a list of integers")
    if not isinstance(config.tensorboard, bool):
        fail("tensorboard", "true or false")


def _check_memory(config):
    """Refuse a model that cannot fit in this machine's memory before allocating any of it
    (``--hidden 1000000000`` would ask for terabytes)."""
    widths = config.widths
    params = sum((a + 1) * b for a, b in zip(widths, widths[1:]))
    # weights, gradients, momenta, plus a few activation buffers per layer for one batch
    need = np.dtype(config.dtype).itemsize * (3 * params + 4 * config.batch_size * sum(widths))
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: let the allocation decide
        return
    if need > have:
        raise TrainError(f"the model needs about {need / 2**30:.1f} GiB for its weights, gradients and "
                         f"momenta, more than this machine's {have / 2**30:.1f} GiB of memory")


def read_toml(path, what):
    """The TOML file at ``path`` as a dict (``what``: how a message names it, e.g. "sweep
    config"); a file that cannot be read as TOML is one TrainError naming it."""
    import tomllib

    name = f"{what} {path}"
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise TrainError(f"{name} not found") from None
    except IsADirectoryError:
        raise TrainError(f"{name} is a directory, not a TOML file") from None
    except UnicodeDecodeError:
        raise TrainError(f"{name}: not a text file (TOML is UTF-8)") from None
    except OSError as exc:
        raise TrainError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise TrainError(f"{name}: not valid TOML ({exc})") from None
