"""Pictures of what a network learned: confusion matrices, its most confident mistakes,
its first layer's weights, and what it saw of a digit from a file.

Figures are drawn on matplotlib ``Figure`` objects (no pyplot state, no display needed)
and written atomically, so an interrupted run never leaves half a PNG.
"""
import io
from pathlib import Path

import numpy as np

from .inspect import (
    SIDE,
    Predictions,
    confident_mistakes,
    first_layer_images,
    hidden_layers,
    load_model,
)

CONFUSION_PNG, MISTAKES_PNG, WEIGHTS_PNG = "confusion_matrix.png", "mistakes.png", "first_layer_weights.png"
DPI = 100


def _figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_png(fig, path):
    """Write ``fig`` to ``path`` atomically; returns the path."""
    from .rundir import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _row_shares(confusion):
    confusion = np.asarray(confusion, np.float64)
    rows = confusion.sum(axis=1, keepdims=True)
    return confusion / np.where(rows > 0, rows, 1)


def draw_confusion(ax, confusion, *, title="", shares=False, fontsize=7):
    """One confusion matrix on ``ax``, coloured by each row's shares (per-class accuracy
    on the diagonal); cells show counts, or with ``shares`` the row shares in %."""
    confusion = np.asarray(confusion)
    share = _row_shares(confusion)
    n = confusion.shape[0]
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if confusion[i, j] == 0:
                continue  # blank cells keep the errors readable
            text = f"{100 * share[i, j]:.1f}" if shares else str(int(confusion[i, j]))
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.tick_params(labelsize=fontsize + 1)


def confusion_figure(confusion, title=""):
    """Counts beside row-normalised percentages (the diagonal: each digit's accuracy)."""
    confusion = np.asarray(confusion)
    fig = _figure(11, 5.2)
    counts, shares = fig.subplots(1, 2)
    accuracy = np.trace(confusion) / confusion.sum()
    fig.suptitle(f"{title}  (test accuracy {100 * accuracy:.2f}%, {confusion.sum()} images)".strip())
    draw_confusion(counts, confusion, title="counts")
    draw_confusion(shares, confusion, title="% of each true digit", shares=True)
    return fig


def confusion_grid_figure(panels, columns=5, title=""):
    """Several confusion matrices in one figure: ``panels`` is a list of (title, matrix)."""
    rows = -(-len(panels) // columns)
    columns = min(columns, len(panels))
    fig = _figure(3.3 * columns, 3.5 * rows + (0.4 if title else 0))
    if title:
        fig.suptitle(title)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax, (title, confusion) in zip(axes, panels):
        confusion = np.asarray(confusion)
        accuracy = 100 * np.trace(confusion) / confusion.sum()
        draw_confusion(ax, confusion, title=f"{title}\n{accuracy:.2f}%", fontsize=5)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    return fig


def _image_grid(fig, count, columns):
    rows = -(-count // columns)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.set_axis_off()
    return axes[:count]


def mistakes_figure(images, labels, predicted, confidence, title="most confident mistakes"):
    """Digits (N, 28, 28) in a grid, each titled true / predicted / probability."""
    columns = 5
    fig = _figure(1.6 * columns, 1.8 * max(1, -(-len(images) // columns)) + 0.4)
    fig.suptitle(title)
    if len(images) == 0:
        fig.text(0.5, 0.5, "no mistakes", ha="center", va="center")
        return fig
    for ax, image, true, pred, prob in zip(_image_grid(fig, len(images), columns), images, labels,
                                           predicted, confidence):
        ax.imshow(image, cmap="gray")
        ax.set_title(f"true {true} / pred {pred}\np = {prob:.3f}", fontsize=8)
    return fig


def weights_figure(images, titles, title):
    """Weight images on one symmetric colour scale: red positive, blue negative, white 0."""
    images = np.asarray(images)
    columns = 5 if len(images) <= 10 else 8
    rows = -(-len(images) // columns)
    fig = _figure(1.3 * columns + 1.0, 1.4 * rows + 0.5)
    fig.suptitle(title)
    limit = float(np.abs(images).max()) or 1.0
    shown = None
    for ax, image, name in zip(_image_grid(fig, len(images), columns), images, titles):
        shown = ax.imshow(image, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(name, fontsize=7)
    fig.colorbar(shown, ax=fig.axes, shrink=0.6, label="weight")
    return fig


def seen_figure(gray, digit, title):
    """A file's image beside the 28x28 digit made from it."""
    fig = _figure(6, 3.4)
    fig.suptitle(title)
    given, seen = fig.subplots(1, 2)
    given.imshow(gray, cmap="gray", vmin=0, vmax=255)
    given.set_title(f"the file ({gray.shape[1]}x{gray.shape[0]})", fontsize=9)
    seen.imshow(digit, cmap="gray", vmin=0, vmax=255)
    seen.set_title("what the network saw (28x28)", fontsize=9)
    for ax in (given, seen):
        ax.set(xticks=[], yticks=[])
    return fig


def write_eval_plots(model, predictions, test_images, out_dir, name=""):
    """The three pictures of ``xpmlp eval --plots`` in ``out_dir``; returns their paths.
    ``test_images``: the (N, 784) inputs whose ``predictions`` these are, any scaling."""
    out_dir, prefix = Path(out_dir), f"{name}: " if name else ""
    written = [save_png(confusion_figure(predictions.confusion, name), out_dir / CONFUSION_PNG)]

    worst = confident_mistakes(predictions.probabilities, predictions.labels)
    images = np.asarray(test_images)[worst].reshape(-1, SIDE, SIDE)
    fig = mistakes_figure(images, predictions.labels[worst], predictions.predicted[worst],
                          predictions.probabilities[worst, predictions.predicted[worst]],
                          title=f"{prefix}the {len(worst)} most confident mistakes")
    written.append(save_png(fig, out_dir / MISTAKES_PNG))

    weights = first_layer_images(model)
    if hidden_layers(model):
        titles, what = [f"unit {i}" for i in range(len(weights))], f"first {len(weights)} hidden units"
    else:
        titles, what = [f"digit {i}" for i in range(len(weights))], "class templates"
    fig = weights_figure(weights, titles, f"{prefix}first-layer weights, {what}")
    written.append(save_png(fig, out_dir / WEIGHTS_PNG))
    return written


def write_confusion_grid(run_dirs, path, titles=None, *, title="", device="cpu", data_dir=None):
    """One figure of the test-set confusion matrices of several runs (e.g. the ten
    networks of the report's Table 11), each titled by ``titles`` or its directory's name."""
    from .data import load_mnist

    data = load_mnist(data_dir, progress=False)
    panels = []
    for i, run_dir in enumerate(run_dirs):
        model = load_model(run_dir, device)
        x = model.backend.asarray(data.test_x, dtype=model.dtype)
        panels.append((titles[i] if titles else Path(run_dir).name,
                       Predictions(model, x, data.test_y).confusion))
    return save_png(confusion_grid_figure(panels, title=title), path)
