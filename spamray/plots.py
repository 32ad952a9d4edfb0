"""The book's two training plots: loss and accuracy against epochs, examples seen on a second axis."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_values(epochs: int, examples_seen: int, train_values: list[float], val_values: list[float], label: str) -> bytes:
    figure, epochs_axis = plt.subplots(figsize=(5, 3))
    epochs_seen = np.linspace(0, epochs, len(train_values))
    epochs_axis.plot(epochs_seen, train_values, label=f"Training {label}")
    epochs_axis.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    epochs_axis.set_xlabel("Epochs")
    epochs_axis.set_ylabel(label.capitalize())
    epochs_axis.legend()
    examples_axis = epochs_axis.twiny()  # the same points, read as examples seen
    examples_axis.plot(np.linspace(0, examples_seen, len(train_values)), train_values, alpha=0)
    examples_axis.set_xlabel("Examples seen")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def plot_history(history: dict, epochs: int, examples_seen: int) -> dict[str, bytes]:
    """{"loss.png": ..., "accuracy.png": ...} from a training history."""
    return {
        "loss.png": plot_values(epochs, examples_seen, history["train_losses"], history["val_losses"], "loss"),
        "accuracy.png": plot_values(epochs, examples_seen, history["train_accs"], history["val_accs"], "accuracy"),
    }


def plot_curve(x: np.ndarray, y: np.ndarray, x_label: str, y_label: str, title: str,
               point: tuple[float, float] | None = None) -> bytes:
    """One curve (ROC or precision-recall) as a PNG, the operating point marked."""
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.plot(x, y, drawstyle="steps-post")
    if point is not None:
        axis.plot(*point, "o", color="crimson", label="operating point")
        axis.legend(loc="lower right")
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    axis.set_title(title)
    axis.set_xlim(-0.01, 1.01)
    axis.set_ylim(-0.01, 1.01)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
