"""The offline end-to-end job: prepare -> train -> evaluate -> export -> score, on the shipped data.

No GPT-2 weights can be downloaded where this runs by default, so it trains a small GPT-2 from
random weights with every layer trainable. The same verbs with `--weights gpt2` are the
production job (see README).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from . import storage
from .config import DemoConfig, EvaluateConfig, PrepareConfig, ScoreConfig, TrainConfig
from .evaluate import evaluate, format_report
from .export import export
from .prepare import prepare, read_labelled
from .score import score
from .train import train

logger = logging.getLogger(__name__)


def demo(cfg: DemoConfig) -> dict:
    started = time.time()
    work = Path(cfg.workdir).resolve()
    data, model, archive, scores = (str(work / name) for name in ("data", "model", "archive", "scores"))
    logger.info(f"spamray demo: OFFLINE, {cfg.preset} trained from RANDOM weights, all layers trainable "
        f"(lr {cfg.learning_rate}, {cfg.epochs} epochs). For the book's model use --weights gpt2 (see README).")

    logger.info("\n== prepare: the shipped SMS Spam Collection, balanced and split 70/10/20")
    prepare(PrepareConfig(output=data, overwrite=True))

    logger.info("\n== train: Ray Train TorchTrainer")
    train(TrainConfig(data=data, output=model, weights="random", preset=cfg.preset, trainable="all",
                      learning_rate=cfg.learning_rate, epochs=cfg.epochs, num_workers=cfg.num_workers,
                      cpus_per_worker=max(1, 2 // cfg.num_workers), storage_path=str(work / "runs"),
                      run_name=f"demo-{int(started)}", precision=cfg.precision, overwrite=True))

    logger.info("\n== evaluate: the test split (curves in evaluation/)")
    report = evaluate(EvaluateConfig(model=model, data=data, split="test", output=str(work / "evaluation")))
    logger.info(format_report(report))

    logger.info("\n== export: ONNX graphs for ONNX Runtime (fp32, int8), each gated against torch, with its own threshold")
    export(model, data)  # (it logs each graph's gate and the thresholds)

    logger.info("\n== score: all 5,574 shipped messages through the Ray Data pipeline")
    for folder in (archive, scores):  # the demo's own, made afresh (scoring refuses a table that holds scores)
        storage.remove(folder)
    Path(archive).mkdir(parents=True)
    read_labelled("sms")[["text"]].to_parquet(f"{archive}/sms.parquet")
    summary = score(ScoreConfig(model=model, input=archive, output=scores))

    minutes = (time.time() - started) / 60
    figures = demo_figures(report)
    logger.info(f"\ndone in {minutes:.1f} min: {figures['text']}; model in {model}; predictions in {scores}")
    return {**figures, "score": summary, "minutes": minutes}


def demo_figures(report: dict) -> dict:
    """The figures a spam filter is judged by: test argmax accuracy (the book's, most probable label),
    ROC AUC, and at the operating point the false-positive rate on the held-out legitimate
    messages and the spam recall on the test split."""
    binary = report["binary"]
    figures = {"test_argmax_accuracy": report["argmax_accuracy"], "roc_auc": binary["roc_auc"]}
    text = f"test argmax accuracy {figures['test_argmax_accuracy']:.2%}, ROC AUC {figures['roc_auc']:.4f}"
    if "heldout_test" in binary:
        figures.update(target_fpr=binary["operating_point"]["target_fpr"],
                       heldout_fpr=binary["heldout_test"]["false_positive_rate"],
                       spam_recall=binary["at_operating_point"]["recall"])
        text += (f"; flagging at most {figures['target_fpr']:.1%} of legitimate messages: "
                 f"{figures['heldout_fpr']:.2%} flagged of {binary['heldout_test']['messages']:,} held out, "
                 f"{figures['spam_recall']:.2%} of the test spam caught")
    return {**figures, "text": text}
