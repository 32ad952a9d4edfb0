"""CPU scoring paths judged on trained classifiers at their operating point.

    python bench/score.py [--classifiers demo small] [--messages 1000] [--rounds 2] [--threads N]
                          [--cache runs/bench] [--small-steps 300]

Two trained classifiers, made once and then read from --cache:
- demo: what `spamray demo` trains (gpt2-mini from random weights, calibrated for a 0.5% target
  false-positive rate);
- small: GPT-2 small's shape from random weights, every layer trained for --small-steps batches of
  8 on the demo's prepared data, then calibrated the same way.

Each path scores the same token ids in this one process: spamray's scorer at fp32 (the baseline)
and bf16, torch's dynamic int8 quantization of the blocks' Linear layers, torch.compile, and
spamray's ONNX Runtime paths (`spamray export`'s fp32 and int8 graphs, run as a replica runs
them), all on the same threads and the same length-bucketed batches. Per path: messages/s on the
first --messages SMS and its ratio to fp32 timed in the same round (median of the rounds: a shared
machine's speed drifts between minutes); then at the operating point, with a threshold chosen for
the classifier's target on the path's own probabilities of heldout_tune (as `spamray calibrate`
chooses one at each precision), on heldout_test's legitimate messages and the test split: labels
equal to fp32's, the largest |dp| of the positive class, the held-out false-positive rate and the
test recall. A path holds where it reaches the bar of issue 21:
>= 1.5x fp32, >= 99.5% of labels equal, the held-out rate within the target, recall within a point.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import first_messages  # noqa: E402

import spamray  # noqa: E402
from spamray import TextClassifier  # noqa: E402
from spamray.calibrate import at_precision, calibrate  # noqa: E402
from spamray.operating_point import threshold_for_fpr  # noqa: E402
from spamray.precision import BF16_CPU_FLAGS, cpu_flags  # noqa: E402
from spamray.prepare import read_prepared_labels, split_url  # noqa: E402
from spamray.train_steps import TokenizeAndPad, training_steps  # noqa: E402

BAR = {"speed": 1.5, "agreement": 0.995, "recall_points": 0.01}


# -- the trained classifiers -------------------------------------------------------------------------
def demo_classifier(cache: Path) -> tuple[str, str]:
    """(model, prepared data) of `spamray demo`, run once into the cache."""
    work = cache / "demo"
    if not (work / "model" / "spamray.json").exists():
        from spamray.cli import main

        if main(["demo", "--workdir", str(work)]) != 0:
            raise SystemExit("spamray demo failed")
    return str(work / "model"), str(work / "data")


def small_classifier(cache: Path, data: str, steps: int) -> str:
    """GPT-2 small's shape from random weights, every layer trained for `steps` batches of 8, calibrated."""
    folder = cache / f"gpt2-small-{steps}-steps"
    if (folder / "spamray.json").exists():
        return str(folder)
    torch.manual_seed(123)
    classifier = TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-small"), read_prepared_labels(data),
                                          trainable="all")
    frame = pd.read_parquet(split_url(data, "train"), columns=["text", "label"])
    collate = TokenizeAndPad(classifier.max_length, None)
    rng = np.random.default_rng(123)

    def batches():
        for _ in range(steps):
            rows = rng.choice(len(frame), 8, replace=False)
            yield collate({"text": frame["text"].to_numpy()[rows], "label": frame["label"].to_numpy()[rows]})

    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-4, weight_decay=0.1)
    started = time.perf_counter()
    classifier.train()
    for step, (_, loss) in enumerate(training_steps(classifier, optimizer, batches(), torch.device("cpu"))):
        if step % 50 == 0:
            print(f"  training gpt2-small: step {step}/{steps}, loss {loss.item():.3f}", flush=True)
    print(f"  trained in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    classifier.eval()
    calibrate(classifier, data, target_fpr=0.005)
    classifier.save(str(folder))
    return str(folder)


# -- the paths ------------------------------------------------------------------------------------
def spamray_bf16(classifier: TextClassifier) -> TextClassifier:
    return at_precision(classifier, "bf16")


def torch_int8_dynamic(classifier: TextClassifier) -> TextClassifier:
    """torch.ao's dynamic quantization (int8 weights, activations quantized per batch) of the
    blocks' Linear layers; the final LayerNorm and the head stay fp32. torch 2.13 deprecates it."""
    from torch.ao.quantization import quantize_dynamic

    int8 = copy.deepcopy(classifier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8.gpt.trf_blocks = quantize_dynamic(int8.gpt.trf_blocks, {torch.nn.Linear}, dtype=torch.qint8)
    return int8


def compiled(precision: str):
    def build(classifier: TextClassifier) -> TextClassifier:
        model = copy.deepcopy(at_precision(classifier, precision))
        model.gpt.hidden_states = torch.compile(model.gpt.hidden_states, dynamic=True)
        return model
    return build


def onnx_runtime(path: str):
    """spamray's ONNX Runtime path (`spamray export`'s graph, run as a replica runs it): the
    classifier's forward is the ONNX session, so bucketing, padding and the probabilities are spamray's."""
    def build(classifier: TextClassifier) -> TextClassifier:
        from spamray.export import with_graph
        from spamray.onnx_graphs import OnnxLogits, export_graphs

        return with_graph(classifier, path, OnnxLogits(export_graphs(classifier)[path], torch.get_num_threads()))
    return build


PATHS = {
    "spamray bf16": spamray_bf16,
    "torch int8 dynamic (Linear)": torch_int8_dynamic,
    "torch.compile fp32": compiled("fp32"),
    "torch.compile bf16": compiled("bf16"),
    "spamray onnx-fp32 (ONNX Runtime)": onnx_runtime("onnx-fp32"),
    "spamray onnx-int8 (ONNX Runtime, 7-bit weights)": onnx_runtime("onnx-int8"),
}


# -- measuring ------------------------------------------------------------------------------------
@dataclass
class Judged:
    path: str
    rate: float
    ratio: float
    agreement: float
    max_dp: float
    heldout_fpr: float
    recall: float

    def holds(self, base: "Judged", target_fpr: float) -> bool:
        return (self.ratio >= BAR["speed"] and self.agreement >= BAR["agreement"]
                and self.heldout_fpr <= max(target_fpr, base.heldout_fpr)
                and base.recall - self.recall <= BAR["recall_points"])


def seconds(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def judge(name: str, model_path: str, data: str, texts: list[str], rounds: int, paths: list[str]) -> list[Judged]:
    """Each path labels with a threshold chosen on its own probabilities of heldout_tune's
    legitimate messages, as `spamray calibrate` chooses one at each precision."""
    base = TextClassifier.load(model_path)
    point = base.operating_point
    positive = base.labels.index(point.positive)
    timing = base.encode(texts)
    tune, heldout, test = (pd.read_parquet(split_url(data, split), columns=["text", "label_name"])
                           for split in ("heldout_tune", "heldout_test", "test"))
    tune_ham = base.encode(tune.loc[tune["label_name"] != point.positive, "text"].tolist())
    ham = base.encode(heldout.loc[heldout["label_name"] != point.positive, "text"].tolist())
    spam = test["label_name"].to_numpy() == point.positive
    judged_ids = ham + base.encode(test["text"].tolist())

    def figures(path: str, model: TextClassifier, rate: float, ratio: float, reference) -> Judged:
        threshold = threshold_for_fpr(model.score_token_ids(tune_ham)[:, positive], point.target_fpr)
        probs = model.score_token_ids(judged_ids)[:, positive]
        flagged = probs >= threshold
        agreement = 1.0 if reference is None else float((flagged == reference[0]).mean())
        max_dp = 0.0 if reference is None else float(np.abs(probs - reference[1]).max())
        return Judged(path, rate, ratio, agreement, max_dp, float(flagged[:len(ham)].mean()),
                      float(flagged[len(ham):][spam].mean()))

    models = {"spamray fp32": base}
    for path in paths:
        started = time.perf_counter()
        models[path] = PATHS[path](base)
        models[path].score_token_ids(timing)  # warm-up on every shape timed (torch.compile compiles here)
        print(f"  {name}: {path} ready in {time.perf_counter() - started:.0f} s", flush=True)
    base.score_token_ids(timing)
    speeds = {path: [] for path in models}
    for _ in range(rounds):  # fp32 beside each path in every round: the ratio of neighbours in time
        for path in paths:
            fp32 = seconds(lambda: base.score_token_ids(timing))
            other = seconds(lambda: models[path].score_token_ids(timing))
            speeds["spamray fp32"].append((len(timing) / fp32, 1.0))
            speeds[path].append((len(timing) / other, fp32 / other))
    results, reference = [], None
    for path, model in models.items():
        rate, ratio = (statistics.median(column) for column in zip(*speeds[path]))
        results.append(figures(path, model, rate, ratio, reference))
        if reference is None:
            fp32 = base.score_token_ids(judged_ids)[:, positive]
            reference = (fp32 >= threshold_for_fpr(base.score_token_ids(tune_ham)[:, positive], point.target_fpr), fp32)
    return results


def markdown(name: str, results: list[Judged], target_fpr: float) -> str:
    base = results[0]
    lines = [f"| {name}: path | msgs/s | × fp32 | labels = fp32 at the threshold | max abs dp | held-out FPR "
             f"(target {target_fpr:.1%}) | test recall | holds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        holds = "baseline" if r is base else ("yes" if r.holds(base, target_fpr) else "no")
        lines.append(f"| {r.path} | {r.rate:,.1f} | {r.ratio:.2f} | {r.agreement:.2%} | {r.max_dp:.4f} | "
                     f"{r.heldout_fpr:.2%} | {r.recall:.2%} | {holds} |")
    return "\n".join(lines)


def cpu_description() -> str:
    model = next((line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    flags = cpu_flags()
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", *BF16_CPU_FLAGS, "amx_int8", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags {' '.join(shown)}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classifiers", nargs="+", default=["demo", "small"], choices=["demo", "small"])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--cache", default="runs/bench")
    parser.add_argument("--small-steps", type=int, default=300)
    args = parser.parse_args()
    cache = Path(args.cache).resolve()
    demo_model, data = demo_classifier(cache)  # the demo's prepared data trains the small one too
    torch.set_num_threads(args.threads)
    texts = first_messages(args.messages)
    print(f"{cpu_description()}; torch {torch.__version__}, {args.threads} threads; timing {len(texts):,} SMS, "
          f"{args.rounds} rounds", flush=True)
    for name in args.classifiers:
        model = demo_model if name == "demo" else small_classifier(cache, data, args.small_steps)
        target = TextClassifier.load(model).operating_point.target_fpr
        print(markdown(f"{name} ({TextClassifier.load(model).cfg.emb_dim}-wide)",
                       judge(name, model, data, texts, args.rounds, args.paths), target), flush=True)


if __name__ == "__main__":
    main()
