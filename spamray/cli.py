"""`spamray <verb>`: one command line, its options generated from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Callable, Sequence

from .config import (CalibrateConfig, ClassifyConfig, DemoConfig, EvaluateConfig, ExportConfig, PrepareConfig,
                     ReportConfig, ScoreConfig, ServeConfig, TrainConfig, VacuumConfig)
from .errors import USER_ERRORS
from .ray_runtime import setup_logging, start_ray


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        meta, kind = dict(field.metadata), hints[field.name]
        optional = type(None) in typing.get_args(kind)  # `X | None`: the option's type is X
        base = next(arg for arg in typing.get_args(kind) if arg is not type(None)) if optional else kind
        options = {"help": meta.get("help", "").replace("%", "%%")}  # argparse formats help with %
        if "choices" in meta:
            options["choices"] = meta["choices"]
        if meta.get("positional"):
            parser.add_argument(field.name, nargs=meta.get("nargs"), **options)
            continue
        flag = "--" + field.name.replace("_", "-")
        if base is bool:
            action = "store_true" if field.default is False else argparse.BooleanOptionalAction
            parser.add_argument(flag, dest=field.name, action=action, default=field.default, **options)
            continue
        if typing.get_origin(base) is list:
            options.update(nargs=meta.get("nargs", "+"), type=typing.get_args(base)[0])
        elif optional and base in (int, float):
            options.update(type=none_or(base), metavar=base.__name__.upper())
        else:
            options["type"] = base
        if meta.get("required"):
            options["required"] = True
        else:
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            options["default"] = default
            if default not in (None, [], ""):
                options["help"] += f" (default: {default})"
        parser.add_argument(flag, dest=field.name, **options)


def none_or(kind: type) -> Callable[[str], object]:
    """An option's type that also takes `none` (or an empty value): the setting switched off."""
    def parse(text: str):
        return None if text.strip().lower() in ("", "none") else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def config_from_args(config_class: type, args: argparse.Namespace):
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


# -- verbs -----------------------------------------------------------------------------------
def run_prepare(cfg: PrepareConfig) -> None:
    from .prepare import prepare

    prepare(cfg)


def run_train(cfg: TrainConfig) -> None:
    from .train import train

    start_ray()
    train(cfg)


def run_evaluate(cfg: EvaluateConfig) -> None:
    from .evaluate import evaluate, format_report

    print(format_report(evaluate(cfg)))


def run_calibrate(cfg: CalibrateConfig) -> None:
    from .calibrate import calibrate
    from .classifier import TextClassifier

    classifier = TextClassifier.load(cfg.model)
    classifier.metrics = {**classifier.metrics, "calibration": calibrate(classifier, cfg.data, cfg.target_fpr,
                                                                               cfg.prior, cfg.precisions)}
    classifier.save(cfg.output or cfg.model, overwrite=True)
    print(f"calibrated classifier saved to {cfg.output or cfg.model} (version {classifier_version(cfg.output or cfg.model)})")


def run_export(cfg: ExportConfig) -> int:
    from .export import export

    report = export(cfg.model, cfg.data, cfg.output)
    output = cfg.output or cfg.model
    print(f"{report.describe()}; saved to {output} (version {classifier_version(output)})")
    if report.refused:
        print(f"spamray export: error: {', '.join(report.refused)} failed the parity gate (see above); scoring "
              "refuses what failed", file=sys.stderr)
        return 1
    return 0


def classifier_version(url: str) -> str:
    from . import saved

    return saved.model_version(saved.read_metadata(url))


def run_classify(cfg: ClassifyConfig) -> None:
    from .classifier import TextClassifier

    texts = [line.rstrip("\n") for line in sys.stdin] if cfg.texts == ["-"] else cfg.texts
    classifier = TextClassifier.load(cfg.model)
    for text, prediction in zip(texts, classifier.predict(texts)):
        print(json.dumps({"text": text, "label": prediction.label, "probability": prediction.probs[prediction.label],
                          "probs": prediction.probs}, ensure_ascii=False))


def run_score(cfg: ScoreConfig) -> int:
    from .score import score

    start_ray()
    failed = score(cfg).files_failed
    if failed:  # the other files are committed; a scheduler must still see that this night was not whole
        print(f"spamray score: error: {len(failed)} input file(s) failed (see FAILED above): {', '.join(failed)}; "
              "the other files were committed, and the next run tries these again", file=sys.stderr)
        return 1
    return 0


def run_serve(cfg: ServeConfig) -> None:
    from .serve import serve_classifier

    serve_classifier(cfg)


def run_vacuum(cfg: VacuumConfig) -> None:
    from .scores_table import ScoresTable

    table = ScoresTable(cfg.output)
    deleted = table.vacuum_unnamed(cfg.retention_hours)
    print(f"vacuum of {table.url}: deleted {len(deleted)} files that no version names, older than {cfg.retention_hours:g} h")


def run_report(cfg: ReportConfig) -> int:
    from .report import AlertLimits, parse_since, report
    from .report_output import format_report, write_report

    result = report(cfg.table, parse_since(cfg.since) if cfg.since else None, cfg.last, cfg.reference)
    print(format_report(result))
    if cfg.out:
        for url in write_report(result, cfg.out, cfg.html):
            print(f"wrote {url}")
    alerts = result.alerts(AlertLimits(cfg.max_psi, cfg.max_failed_files, cfg.max_share_change))
    for alert in alerts:
        print(f"spamray report: ALERT {alert}", file=sys.stderr)
    return ALERT_EXIT if alerts else 0


def run_demo(cfg: DemoConfig) -> None:
    from .demo import demo

    start_ray()
    demo(cfg)


# `spamray report`'s exit status when a run passes a limit: apart from 1 (an error) and 2 (bad
# options), so that a scheduled job can tell an alert from a failure.
ALERT_EXIT = 3

# Each verb's function returns its exit status (None means 0).
VERBS: dict[str, tuple[type, Callable, str]] = {
    "prepare": (PrepareConfig, run_prepare, "read, balance and split labelled messages (the book's procedure)"),
    "train": (TrainConfig, run_train, "fine-tune GPT-2 into a classifier with Ray Train"),
    "evaluate": (EvaluateConfig, run_evaluate, "accuracy, precision, recall, F1, confusion matrix; for a spam "
                 "filter ROC and precision-recall (curves with --output), the operating point, calibration"),
    "calibrate": (CalibrateConfig, run_calibrate, "fit temperature scaling and a spam filter's threshold for a "
                  "target false-positive rate on a prepared folder's held-out data"),
    "export": (ExportConfig, run_export, "ONNX graphs of a saved classifier (fp32 and int8) for ONNX Runtime, each "
               "gated against torch and given its own threshold, saved in its folder"),
    "classify": (ClassifyConfig, run_classify, "label a few messages (one JSON line each)"),
    "score": (ScoreConfig, run_score, "score Parquet/CSV archives with Ray Data into a Delta Lake table"),
    "serve": (ServeConfig, run_serve, "classify messages online: the saved classifier behind HTTP with Ray Serve "
              "(POST /classify, GET /healthz, GET /model), requests batched, or write its Serve config file"),
    "vacuum": (VacuumConfig, run_vacuum, "maintenance of a scores table: delete the files no version names (killed "
               "runs', replaced ones) once older than --retention-hours"),
    "report": (ReportConfig, run_report, "what the filter did, run by run, from a scores table: volume, failures, "
               "spam share, score drift (PSI), model, precision and threshold; JSON, plots and an HTML page with "
               "--out; exit 3 past an alert limit"),
    "demo": (DemoConfig, run_demo, "offline end to end: prepare, train a small GPT-2 from random weights, "
             "evaluate, score"),
}

# USER_ERRORS mean the input, the settings or the storage are wrong: one clear line, no traceback.
# Anything else (a bug, CUDA out of memory) prints its traceback.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spamray", description="GPT-2 text classification on Ray")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for name, (config_class, _, help_text) in VERBS.items():
        verb = verbs.add_parser(name, help=help_text, description=help_text)
        add_config_arguments(verb, config_class)
        verb.add_argument("-v", "--verbose", action="store_true",
                          help="also show Ray's INFO lines, its progress bars and its workers' output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    config_class, run, _ = VERBS[args.verb]
    try:
        return run(config_from_args(config_class, args)) or 0
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"spamray {args.verb}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
