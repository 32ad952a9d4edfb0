"""What a classifier computes with, and what `--precision auto` picks for the machine.

A path is an engine and a precision: torch fp32 and bf16, and ONNX Runtime running the exported
graph in fp32 or with int8 weights (spamray.onnx_graphs). bf16 halves the memory traffic and, on
hardware built for it, runs matrix products at several times fp32's rate: a GPU's tensor cores,
and CPUs with bf16 matrix units or instructions (Intel AMX, AVX512-BF16 on Intel Cooper Lake and
later and on AMD Zen 4 and later); on a CPU without them bf16 only adds conversions. ONNX
Runtime's int8 runs on every x86 CPU. bench/score.py measures each path on trained classifiers at
their operating point (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .onnx_graphs import ONNX_PATHS

TORCH_PRECISIONS = ("fp32", "bf16")  # what the torch model computes in (TextClassifier.set_precision)
PRECISIONS = (*TORCH_PRECISIONS, *ONNX_PATHS)  # every path a classifier can score with
PRECISION_CHOICES = ("auto", *PRECISIONS)
TRAINING_PRECISION_CHOICES = ("auto", *TORCH_PRECISIONS)  # what training steps compute in
# /proc/cpuinfo flags of bf16 matrix units or instructions that oneDNN runs bf16 products on.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# `auto` on a CPU: the fastest path first. bench/score.py on trained classifiers, x fp32: ONNX
# Runtime int8 1.7-2.1 (Zen 3, AVX2) and 3.4-5.8 (Zen 5); bf16 2.1-3.2 (Zen 5 only); ONNX
# Runtime fp32 1.4-1.6 (Zen 3) and 1.8-2.0 (Zen 5).
CPU_SPEED_ORDER = ("onnx-int8", "bf16", "onnx-fp32", "fp32")
TRAINING_SPEED_ORDER = ("bf16", "fp32")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # the path: one of PRECISIONS
    reason: str  # why, in words for the run's log and its record


NO_EXPORTS = "it carries no ONNX graphs; run `spamray export MODEL DATA` to make them"


def resolve_precision(requested: str, on_gpu: bool, flags: frozenset[str] | None = None,
                      operating_point: dict | None = None, threshold_given: bool = False,
                      exports: Mapping[str, str | None] | None = None,
                      order: tuple[str, ...] = CPU_SPEED_ORDER) -> PrecisionChoice:
    """The path scoring runs with: `requested` unless it is `auto`, which is bf16 on a GPU, and on a
    CPU the first of `order` (the fastest first) that this CPU offers (`flags`, this machine's by default) and
    the classifier carries: an ONNX graph that passed its export's gate (`exports`: each ONNX path's
    problem, None where it has none) and, with an operating point, a threshold chosen on that
    path's own probabilities (`threshold_problem`). An explicit path that cannot hold is refused.

    A threshold the user gave (`threshold_given`) is one number, chosen at no path spamray knows:
    `auto` applies it to fp32's probabilities, an explicit path to its own, and the reason says which."""
    if requested != "auto" and requested not in order:
        raise ValueError(f"unknown precision {requested!r}; choose one of auto, {', '.join(sorted(order))}")
    if requested != "auto":
        problem = path_problem(requested, operating_point, exports, None)
        if problem:
            raise ValueError(f"--precision {requested}: {problem}; score with --precision fp32, or calibrate again")
        applied = f"; --threshold applied to {requested} probabilities" if threshold_given else ""
        return PrecisionChoice(requested, f"as asked (--precision){applied}")
    if threshold_given:
        return PrecisionChoice("fp32", "auto: --threshold is applied to fp32 probabilities, as calibration chooses "
                                       "thresholds (--precision PATH applies it to that path's)")
    if on_gpu:
        problem = threshold_problem(operating_point, "bf16")
        if problem:
            return PrecisionChoice("fp32", f"auto: bf16 would suit a GPU (tensor cores), but {problem}")
        return PrecisionChoice("bf16", "auto: a GPU (tensor cores)")
    flags = cpu_flags() if flags is None else flags
    passed_over = []
    for path in order:
        problem = path_problem(path, operating_point, exports, flags)
        if problem is None:
            return PrecisionChoice(path, f"auto: the fastest path that holds on this CPU ({grounds(path, flags)})"
                                         + "".join(f"; not {other}: {why}" for other, why in passed_over))
        passed_over.append((path, problem))
    raise AssertionError("fp32 always holds")


def grounds(path: str, flags: frozenset[str]) -> str:
    """Why a path holds, in words for the reason of `auto`'s choice."""
    if path == "bf16":
        return f"a CPU with {', '.join(sorted(set(BF16_CPU_FLAGS) & flags))}"
    if path in ONNX_PATHS:
        return f"the classifier's {path} graph passed its export's parity gate"
    return "torch fp32, which every CPU runs"


def path_problem(path: str, operating_point: dict | None, exports: Mapping[str, str | None] | None,
                 flags: frozenset[str] | None) -> str | None:
    """Why `path` cannot score this classifier (None: it can). With `flags`, also whether this CPU
    runs it fast: bf16 only with bf16 units (asked for explicitly, it runs anywhere)."""
    if path == "bf16" and flags is not None:
        found = sorted(set(BF16_CPU_FLAGS) & flags)
        if not found:
            return (f"this CPU has no bf16 matrix units or instructions ({' or '.join(BF16_CPU_FLAGS)}), where bf16 "
                    "only adds conversions")
    if path in ONNX_PATHS:
        problem = (exports or {}).get(path, NO_EXPORTS)
        if problem:
            return problem
    return threshold_problem(operating_point, path)


def threshold_problem(operating_point: dict | None, precision: str) -> str | None:
    """Why a classifier cannot label with `precision`'s probabilities, or None: its operating point
    has a threshold chosen on them."""
    if not operating_point or precision == "fp32" or precision in operating_point["thresholds"]:
        return None
    return (f"no threshold was chosen at {precision} (`spamray calibrate --precisions {precision}` chooses one, "
            f"`spamray export` for the ONNX paths)")


def cluster_precision(requested: str, operating_point: dict | None = None, probe_cpus: float = 0.25,
                      threshold_given: bool = False, exports: Mapping[str, str | None] | None = None,
                      order: tuple[str, ...] = CPU_SPEED_ORDER) -> PrecisionChoice:
    """`resolve_precision` for the Ray cluster's workers: `auto` follows their hardware, the
    cluster's GPUs, else the CPU of a node that runs tasks (a probe task of `probe_cpus`; the
    driver may sit on a head node of another kind that runs none)."""
    if requested != "auto" or threshold_given:
        return resolve_precision(requested, False, frozenset(), operating_point, threshold_given, exports, order)
    import ray

    on_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if on_gpu or sum(node["Alive"] for node in ray.nodes()) == 1:  # one node: the driver's CPU is the workers'
        return resolve_precision(requested, on_gpu, None, operating_point, exports=exports, order=order)
    flags = ray.get(ray.remote(cpu_flags).options(num_cpus=probe_cpus).remote())
    return resolve_precision(requested, on_gpu, flags, operating_point, exports=exports, order=order)
