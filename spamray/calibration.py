"""How a classifier's logits become probabilities and labels: one value that calibration sets whole.

Probabilities are softmax(logits / temperature), the temperature fitted on the validation split.
For a binary classifier the positive class's log-odds can be shifted from its share in the messages
calibrated on (`calibrated_share`) to its share in real traffic (`prior`). Labels come from the
operating point's threshold on the positive class's probability, chosen at each scoring path, or,
without an operating point, from the most probable class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .operating_point import OperatingPoint


@dataclass(frozen=True)
class Calibration:
    positive: str | None  # the class a binary classifier flags: what a threshold applies to
    temperature: float = 1.0
    calibrated_share: float | None = None  # the positive class's share where the temperature was fitted
    prior: float | None = None  # its share in real traffic (calibrate --prior)
    operating_point: OperatingPoint | None = None  # None: the most probable label wins

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"a temperature must be positive, not {self.temperature}")
        if self.prior is not None and self.calibrated_share is None:
            raise ValueError("a prior shifts probabilities from the calibrated share: give both")

    def check_labels(self, labels: list[str]) -> None:
        """Refuses a calibration that names a class the classifier does not have."""
        named = {self.positive, self.operating_point.positive if self.operating_point else None} - {None}
        unknown = sorted(named - set(labels))
        if unknown:
            raise ValueError(f"the calibration's positive class {unknown} is not one of the labels {labels}")
        if (self.prior is not None or self.operating_point is not None) and len(labels) != 2:
            raise ValueError(f"a prior or an operating point applies to two labels, not {len(labels)}")

    def probabilities(self, logits: np.ndarray, labels: list[str]) -> np.ndarray:
        """Calibrated class probabilities (float32, as the scores table stores them and the
        threshold is chosen on)."""
        scaled = np.asarray(logits, dtype=np.float64) / self.temperature
        if self.prior is not None:
            scaled[:, labels.index(self.positive)] += prior_shift(self.calibrated_share, self.prior)
        return softmax(scaled).astype(np.float32)

    def label_ids(self, probs: np.ndarray, labels: list[str], precision: str,
                  threshold: float | None = None) -> np.ndarray:
        """Each row's label: with an operating point, the positive label where its probability
        reaches the threshold chosen at `precision` (`threshold` overrides it), else the other;
        without one, the most probable label."""
        point = self.operating_point
        if point is None and threshold is None:
            return probs.argmax(axis=1)
        if len(labels) != 2:
            raise ValueError(f"a threshold applies to a classifier of two labels, not {len(labels)}")
        positive = labels.index(point.positive if point else self.positive)
        if threshold is None:
            threshold = point.threshold_at(precision)
            if threshold is None:
                raise ValueError(f"no threshold was chosen at {precision}: `spamray calibrate --precisions "
                                 f"{precision}` chooses one, or compute in fp32")
        return np.where(probs[:, positive] >= threshold, positive, 1 - positive)

    def to_metadata(self) -> dict:
        """The keys of spamray.json that hold it."""
        return {"temperature": self.temperature, "positive_label": self.positive,
                "calibrated_share": self.calibrated_share, "prior": self.prior,
                "operating_point": self.operating_point.to_dict() if self.operating_point else None}

    @classmethod
    def from_metadata(cls, metadata: dict) -> "Calibration":
        point = metadata["operating_point"]
        return cls(positive=metadata["positive_label"], temperature=float(metadata["temperature"]),
                   calibrated_share=metadata["calibrated_share"], prior=metadata["prior"],
                   operating_point=OperatingPoint(**point) if point else None)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Rows of class probabilities (float64) from rows of logits."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def prior_shift(calibrated_share: float, prior: float) -> float:
    """What Bayes' rule adds to the positive class's log-odds when its share of the messages
    moves from `calibrated_share` (where the probabilities were calibrated) to `prior`."""
    log_odds = lambda share: float(np.log(share) - np.log1p(-share))  # noqa: E731
    return log_odds(prior) - log_odds(calibrated_share)
