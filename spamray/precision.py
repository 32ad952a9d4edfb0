"""What a classifier computes in, and what `--precision auto` picks for the machine.

bf16 halves the memory traffic and, on hardware built for it, runs matrix products at several
times fp32's rate: a GPU's tensor cores, and CPUs with bf16 matrix units or instructions (Intel
AMX, AVX512-BF16 on Intel Cooper Lake and later and on AMD Zen 4 and later), which oneDNN uses for
torch's bf16 matrix products. On a CPU without them bf16 only adds conversions. bench/score.py
measures each path on trained classifiers at their operating point (README, "Performance").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("fp32", "bf16")  # what a classifier computes in (TextClassifier.set_precision)
PRECISION_CHOICES = ("auto", *PRECISIONS)
# /proc/cpuinfo flags of bf16 matrix units or instructions that oneDNN runs bf16 products on.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


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
    precision: str
    reason: str  # why, in words for the run's log and its record


def resolve_precision(requested: str, on_gpu: bool, flags: frozenset[str] | None = None,
                      operating_point: dict | None = None, threshold_given: bool = False) -> PrecisionChoice:
    """The precision scoring runs in: `requested` unless it is `auto`, which is bf16 on a GPU and
    on a CPU with bf16 units (`flags`, this machine's by default), fp32 elsewhere.

    A classifier with an operating point labels at bf16 only with a threshold calibration chose at
    bf16 (`threshold_problem`): `auto` falls back to fp32 where there is none, and an explicit
    bf16 is refused. A threshold the user gave (`threshold_given`) is one number, chosen at no
    precision spamray knows: `auto` applies it to fp32's probabilities, an explicit bf16 to bf16's,
    and the reason says which."""
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISION_CHOICES)}")
    if requested != "auto":
        problem = threshold_problem(operating_point, requested)
        if problem:
            raise ValueError(f"--precision {requested}: {problem}; score with --precision fp32, or calibrate again")
        applied = f"; --threshold applied to {requested} probabilities" if threshold_given else ""
        return PrecisionChoice(requested, f"as asked (--precision){applied}")
    if threshold_given:
        return PrecisionChoice("fp32", "auto: --threshold is applied to fp32 probabilities, as calibration chooses "
                                       "thresholds (--precision bf16 applies it to bf16's)")
    if on_gpu:
        units = "a GPU (tensor cores)"
    else:
        found = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
        if not found:
            return PrecisionChoice("fp32", "auto: this CPU has no bf16 matrix units or instructions "
                                           f"({' or '.join(BF16_CPU_FLAGS)}), where bf16 only adds conversions")
        units = f"a CPU with {', '.join(found)}"
    problem = threshold_problem(operating_point, "bf16")
    if problem:
        return PrecisionChoice("fp32", f"auto: bf16 would suit {units}, but {problem}")
    return PrecisionChoice("bf16", f"auto: {units}")


def threshold_problem(operating_point: dict | None, precision: str) -> str | None:
    """Why a classifier cannot label at `precision`, or None: its operating point has a threshold
    chosen at that precision (classifiers calibrated before spamray chose one a precision have
    fp32's alone)."""
    if not operating_point or precision == "fp32" or precision in (operating_point.get("thresholds") or {}):
        return None
    return (f"the classifier's threshold was chosen at fp32 only (calibrated by an older spamray); `spamray calibrate` "
            f"chooses one at every precision")


def cluster_precision(requested: str, operating_point: dict | None = None, probe_cpus: float = 0.25,
                      threshold_given: bool = False) -> PrecisionChoice:
    """`resolve_precision` for the Ray cluster's workers: `auto` follows their hardware, the
    cluster's GPUs, else the CPU of a node that runs tasks (a probe task of `probe_cpus`; the
    driver may sit on a head node of another kind that runs none)."""
    if requested != "auto" or threshold_given:
        return resolve_precision(requested, False, frozenset(), operating_point, threshold_given)
    import ray

    on_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if on_gpu or sum(node["Alive"] for node in ray.nodes()) == 1:  # one node: the driver's CPU is the workers'
        return resolve_precision(requested, on_gpu, None, operating_point)
    flags = ray.get(ray.remote(cpu_flags).options(num_cpus=probe_cpus).remote())
    return resolve_precision(requested, on_gpu, flags, operating_point)
