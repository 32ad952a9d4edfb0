"""The operating-point metrics against scikit-learn on the same scores."""

import numpy as np
import pytest
from sklearn import metrics

from spamray.operating_point import (average_precision, expected_calibration_error, fit_temperature, log_loss,
                                     precision_recall_curve, rates_at, recall_at_fpr, roc_auc, roc_curve, softmax,
                                     threshold_for_fpr)


@pytest.fixture(params=[0, 1, 2])
def scored(request):
    """Scores of 2,000 legitimate and 300 spam messages, ties included (rounded scores)."""
    rng = np.random.default_rng(request.param)
    ham, spam = rng.beta(2, 8, 2000), rng.beta(6, 2, 300)
    scores = np.round(np.r_[ham, spam], 3 if request.param == 2 else 6)
    return scores, np.r_[np.zeros(2000, int), np.ones(300, int)]


def test_both_aucs_and_the_curves_equal_scikit_learns(scored):
    scores, labels = scored
    assert roc_auc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(metrics.average_precision_score(labels, scores), abs=1e-12)
    for ours, theirs in zip(roc_curve(scores, labels), metrics.roc_curve(labels, scores, drop_intermediate=False)):
        np.testing.assert_allclose(ours, theirs)
    for ours, theirs in zip(precision_recall_curve(scores, labels), metrics.precision_recall_curve(labels, scores)):
        np.testing.assert_allclose(ours, theirs)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_precision_and_recall_at_a_threshold_equal_scikit_learns(scored, threshold):
    scores, labels = scored
    flagged = (scores >= threshold).astype(int)
    rates = rates_at(threshold, scores, labels)
    assert rates["precision"] == pytest.approx(metrics.precision_score(labels, flagged))
    assert rates["recall"] == pytest.approx(metrics.recall_score(labels, flagged))
    tn, fp, _, _ = metrics.confusion_matrix(labels, flagged).ravel()
    assert rates["false_positive_rate"] == pytest.approx(fp / (fp + tn))


@pytest.mark.parametrize("target", [0.001, 0.005, 0.01, 0.05])
def test_the_chosen_threshold_is_the_lowest_that_keeps_the_false_positive_budget(scored, target):
    scores, labels = scored
    threshold = threshold_for_fpr(scores[labels == 0], target)
    assert rates_at(threshold, scores, labels)["false_positive_rate"] <= target
    # scikit-learn's ROC points: the best recall among thresholds within the budget is ours
    fpr, tpr, thresholds = metrics.roc_curve(labels, scores, drop_intermediate=False)
    assert rates_at(threshold, scores, labels)["recall"] == pytest.approx(tpr[fpr <= target].max())
    assert recall_at_fpr(scores, labels, target) == pytest.approx(tpr[fpr <= target].max())
    below = thresholds[(thresholds < threshold)].max(initial=-np.inf)  # the next lower point spends more
    assert rates_at(below, scores, labels)["false_positive_rate"] > target or below == -np.inf


def test_calibration_lowers_the_log_loss_of_an_over_confident_model():
    rng = np.random.default_rng(7)
    true_logit = rng.normal(0.0, 2.0, 8000)
    labels = (rng.random(8000) < 1 / (1 + np.exp(-true_logit))).astype(int)  # calibrated at T = 1
    logits = np.c_[np.zeros(8000), true_logit] * 4.0  # four times too sure of itself
    before = softmax(logits)
    temperature = fit_temperature(logits, labels)
    after = softmax(logits, temperature)
    assert temperature == pytest.approx(4.0, rel=0.1)
    assert log_loss(after, labels) < log_loss(before, labels)
    assert log_loss(before, labels) == pytest.approx(metrics.log_loss(labels, before))
    assert expected_calibration_error(after, labels) < expected_calibration_error(before, labels) / 2
    assert (after.argmax(axis=1) == before.argmax(axis=1)).all()  # the labels do not change
