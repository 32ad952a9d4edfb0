"""spamray's plots as PNG bytes: the book's two training plots (loss and accuracy against epochs,
examples seen on a second axis), evaluation's curves, and the nightly report's volume, spam share
and score histograms."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


MAX_TICKS = 12


def png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


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
    return png(figure)


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
    return png(figure)


def plot_nights(moments: list, rows: list[int], shares: list[float | None], failed: list[int], positive: str) -> bytes:
    """Volume (bars, runs with failed files in red) and the positive class's share, a slot per run
    in commit order, labelled with its commit time (at most MAX_TICKS labels)."""
    slots = np.arange(len(moments))
    figure, (volume, share) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    volume.bar(slots, rows, width=0.8, color=["crimson" if n else "steelblue" for n in failed])
    volume.set_ylabel("rows scored")
    volume.set_title("each run: volume (red: some files failed) and share labelled " + positive)
    share.plot(slots, [np.nan if s is None else 100 * s for s in shares], "o-", color="darkorange",
               markersize=4 if len(slots) < 60 else 0)
    share.set_ylabel(f"{positive} share (%)")
    share.set_ylim(bottom=0)
    ticks = slots[::max(1, -(-len(slots) // MAX_TICKS))]
    share.set_xticks(ticks, [f"{moments[i]:%m-%d %H:%M}" for i in ticks], rotation=30, ha="right")
    return png(figure)


def plot_histograms(current: list[float], reference: list[float], current_name: str, reference_name: str,
                    positive: str, psi: float | None) -> bytes:
    """A run's positive-class probabilities over its reference's, as shares of equal bins."""
    figure, axis = plt.subplots(figsize=(8, 3.5))
    edges = np.linspace(0, 1, len(reference) + 1)
    axis.bar(edges[:-1], reference, width=edges[1] - edges[0], align="edge", color="lightgray",
             edgecolor="gray", label=f"reference {reference_name}")
    if current:
        axis.stairs(current, edges, color="crimson", linewidth=2, label=current_name)
    axis.set_yscale("symlog", linthresh=0.01)
    axis.set_xlabel(f"p({positive})")
    axis.set_ylabel("share of rows")
    axis.set_title(f"score distribution: PSI {psi:.3f}" if psi is not None else "score distribution")
    axis.legend(loc="upper center")
    return png(figure)
