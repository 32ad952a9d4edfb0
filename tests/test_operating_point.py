"""The operating point's own code (the threshold for a false-positive budget, the rates at it),
temperature scaling and the prior shift, checked against scikit-learn and plain arithmetic."""

import json

import numpy as np
import pytest
from sklearn import metrics

from spamray.calibrate import calibration_report, expected_calibration_error, fit_temperature
from spamray.calibration import prior_shift, softmax
from spamray.operating_point import rates_at, recall_at_fpr, threshold_for_fpr


@pytest.fixture(params=[0, 1, 2])
def scored(request):
    """Scores of 2,000 legitimate and 300 spam messages, ties included (rounded scores)."""
    rng = np.random.default_rng(request.param)
    ham, spam = rng.beta(2, 8, 2000), rng.beta(6, 2, 300)
    scores = np.round(np.r_[ham, spam], 3 if request.param == 2 else 6)
    return scores, np.r_[np.zeros(2000, int), np.ones(300, int)]


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


def test_a_threshold_chosen_on_float32_scores_flags_exactly_the_budget_in_float32():
    """Scores come from the classifier as float32; a float64 threshold just above a float32
    score rounds back onto it when compared with float32 scores (NumPy 2), flagging the message
    it was chosen to pass."""
    ham = np.random.default_rng(3).beta(2, 8, 2000).astype(np.float32)
    for target in (0.001, 0.005, 0.01):
        threshold = threshold_for_fpr(ham, target)
        assert np.float32(threshold) == threshold  # a float32 value: compared the same at either width
        assert int((ham >= threshold).sum()) == int(target * ham.size)  # no ties: exactly the budget
        assert int((ham.astype(np.float64) >= threshold).sum()) == int(target * ham.size)


def test_temperature_scaling_finds_the_minimum_and_calibrates_an_over_confident_model():
    rng = np.random.default_rng(7)
    true_logit = rng.normal(0.0, 2.0, 8000)
    labels = (rng.random(8000) < 1 / (1 + np.exp(-true_logit))).astype(int)  # calibrated at T = 1
    logits = np.c_[np.zeros(8000), true_logit] * 4.0  # four times too sure of itself
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(4.0, rel=0.1)
    grid = np.exp(np.linspace(np.log(2.0), np.log(8.0), 2001))
    losses = [metrics.log_loss(labels, softmax(logits, t)) for t in grid]
    assert temperature == pytest.approx(grid[int(np.argmin(losses))], rel=2e-3)  # the grid's best, found
    report = calibration_report(logits, labels, temperature)
    assert report["log_loss_after"] < report["log_loss_before"]
    before, after = softmax(logits), softmax(logits, temperature)
    assert report["log_loss_before"] == pytest.approx(metrics.log_loss(labels, before))
    assert expected_calibration_error(after, labels) < expected_calibration_error(before, labels) / 2
    assert (after.argmax(axis=1) == before.argmax(axis=1)).all()  # the labels do not change


def test_the_prior_shift_is_bayes_rule_on_the_odds():
    # A message at even odds in a 50/50 mix is spam with the prior's probability in real traffic.
    shifted = softmax(np.array([[0.0, 0.0]]) + [0.0, prior_shift(0.5, 0.13)])
    assert shifted[0, 1] == pytest.approx(0.13)
    # In general the odds are multiplied by (prior odds) / (calibration odds).
    p, share, prior = 0.9, 0.53, 0.2
    odds = p / (1 - p) * (prior / (1 - prior)) / (share / (1 - share))
    moved = softmax(np.array([[0.0, np.log(p / (1 - p))]]) + [0.0, prior_shift(share, prior)])
    assert moved[0, 1] == pytest.approx(odds / (1 + odds))
    assert prior_shift(0.3, 0.3) == 0.0


def test_a_classifier_takes_its_calibration_whole_and_keeps_it_through_save_and_load(tmp_path):
    import spamray
    from spamray import TextClassifier
    from spamray.calibration import Calibration
    from spamray.operating_point import OperatingPoint
    from spamray.saved import SavedClassifierError

    classifier = TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), ["ham", "spam"])
    point = OperatingPoint("spam", 0.9, 0.005, "heldout_tune", 100, 0.0, {"fp32": 0.0}, {"fp32": 0.9})
    calibration = Calibration("spam", temperature=1.7, calibrated_share=0.5, prior=0.1, operating_point=point)
    classifier.set_calibration(calibration)
    with pytest.raises(AttributeError):
        classifier.temperature = 2.0  # set through set_calibration only, never field by field
    with pytest.raises(ValueError, match=r"positive class \['phishing'\] is not one of the labels"):
        classifier.set_calibration(Calibration("phishing"))
    with pytest.raises(ValueError, match="a prior shifts probabilities from the calibrated share"):
        Calibration("spam", prior=0.1)
    classifier.save(str(tmp_path / "model"))
    loaded = TextClassifier.load(str(tmp_path / "model"))
    assert loaded.calibration == calibration
    logits = np.array([[0.3, 1.2], [2.0, -1.0]])
    np.testing.assert_array_equal(loaded.probabilities(logits), classifier.probabilities(logits))
    record = json.loads((tmp_path / "model" / "spamray.json").read_text())
    del record["temperature"]
    (tmp_path / "model" / "spamray.json").write_text(json.dumps(record))
    with pytest.raises(SavedClassifierError, match="spamray.json holds no valid calibration .*temperature"):
        TextClassifier.load(str(tmp_path / "model"))
