"""A training run's settings (``TrainConfig``) and their checks.

Kept apart from the training loop so that the CLI and the sweep can validate settings
without importing it.  The names of models, activations, losses and dtypes come from
``model.py``, where the builder defines them.
"""
import dataclasses
import math

from .model import ACTIVATIONS, DTYPES, LOSSES, MODELS, build_mlp, build_model

# Settings that define the trajectory: a resume must not contradict them.
TRAJECTORY_KEYS = ("model", "hidden", "activation", "loss", "batch_size", "lr", "momentum",
                   "weight_decay", "init_std", "seed", "dtype")


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
    eval_every: int = 1
    checkpoint_every: int = 1
    log_every: int = 1
    tensorboard: bool = False

    def validate(self):
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
        if not 0 <= self.momentum <= 1:
            raise TrainError(f"--momentum must be in [0, 1], got {self.momentum}")
        if not self.weight_decay >= 0:
            raise TrainError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not self.init_std > 0:
            raise TrainError(f"--init-std must be positive, got {self.init_std}")
        if self.dtype not in DTYPES:
            raise TrainError(f"--dtype must be {one_of(DTYPES)}, got {self.dtype!r}")
        if self.batch_size > 60000:
            raise TrainError(f"--batch-size {self.batch_size} exceeds the 60000 training images")
        return self

    @property
    def name(self):
        if self.hidden is None:
            return self.model
        return f"mlp{'-'.join(map(str, self.hidden)) or '0'}-{self.activation}-{self.loss}"

    def build(self, backend, **options):
        """The model these settings describe, on ``backend``; ``options`` go to the builder."""
        common = dict(backend=backend, dtype=self.dtype, init_std=self.init_std, seed=self.seed, **options)
        if self.hidden is None:
            return build_model(self.model, **common)
        return build_mlp(self.hidden, self.activation, self.loss, **common)

    @classmethod
    def from_saved(cls, saved):
        """The config of a saved config.json (its extra keys, e.g. versions, ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in saved.items() if k in fields})
        if config.hidden is not None:  # the saved "model" is a name derived from hidden/activation/loss
            config.model = cls.model
        return config
