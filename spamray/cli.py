"""`spamray <verb>`: one command line, its options generated from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Callable, Sequence

from .config import ClassifyConfig, DemoConfig, EvaluateConfig, PrepareConfig, ScoreConfig, TrainConfig


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


def config_from_args(config_class: type, args: argparse.Namespace):
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def start_ray() -> None:
    """Joins the cluster in RAY_ADDRESS (as under `ray job submit`), or starts local Ray in-process."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


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
    failed = score(cfg)["files_failed"]
    if failed:  # the other files are committed; a scheduler must still see that this night was not whole
        print(f"spamray score: error: {len(failed)} input file(s) failed (see FAILED above): {', '.join(failed)}; "
              "the other files were committed, and the next run tries these again", file=sys.stderr)
        return 1
    return 0


def run_demo(cfg: DemoConfig) -> None:
    from .demo import demo

    start_ray()
    demo(cfg)


# Each verb's function returns its exit status (None means 0).
VERBS: dict[str, tuple[type, Callable, str]] = {
    "prepare": (PrepareConfig, run_prepare, "read, balance and split labelled messages (the book's procedure)"),
    "train": (TrainConfig, run_train, "fine-tune GPT-2 into a classifier with Ray Train"),
    "evaluate": (EvaluateConfig, run_evaluate, "accuracy, precision, recall, F1 and confusion matrix"),
    "classify": (ClassifyConfig, run_classify, "label a few messages (one JSON line each)"),
    "score": (ScoreConfig, run_score, "score Parquet/CSV archives with Ray Data into a Delta Lake table"),
    "demo": (DemoConfig, run_demo, "offline end to end: prepare, train a small GPT-2 from random weights, "
             "evaluate, score"),
}

# Errors that mean the input or settings are wrong: one clear line, no traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spamray", description="GPT-2 text classification on Ray")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for name, (config_class, _, help_text) in VERBS.items():
        add_config_arguments(verbs.add_parser(name, help=help_text, description=help_text), config_class)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config_class, run, _ = VERBS[args.verb]
    try:
        return run(config_from_args(config_class, args)) or 0
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"spamray {args.verb}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
