"""The classifier as ONNX graphs that ONNX Runtime runs: fp32, and int8 weights quantized dynamically.

The PyTorch `TextClassifier` stays the one definition of the model: `torch.onnx.export` traces its
forward (token ids and true lengths in, class logits out) with the batch and the sequence length
left dynamic, so ONNX Runtime scores spamray's own length-bucketed batches. The graphs live in the
saved classifier's folder beside the weights, each with its sha256 and the versions that made it
(`OnnxExports`, in spamray.json); a replica checks them as it loads them, as it checks the weights.

int8: ONNX Runtime's dynamic quantization (int8 weights, activations quantized per batch) of the
matrix products, with 7-bit weights (`reduce_range`): on x86 CPUs without VNNI (AVX2 alone) ONNX
Runtime's u8s8 kernels add pairs of 8-bit products in 16 bits, which can saturate; 7-bit weights
cannot, and ONNX Runtime's documentation names them for those CPUs. The export's parity gate
(spamray.export) measures what the int8 graph labels, and refuses it where that moved.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from . import storage
from .errors import SpamrayError

ONNX_PATHS = ("onnx-fp32", "onnx-int8")
GRAPH_FILES = {"onnx-fp32": "model.fp32.onnx", "onnx-int8": "model.int8.onnx"}
OPSET = 18
# One ONNX file holds at most 2 GB (protobuf's limit); larger classifiers score with torch.
MAX_GRAPH_BYTES = 2_000_000_000


class OnnxExportError(SpamrayError, ValueError):
    """An ONNX graph that cannot be made or used, and what to run instead."""


def runtime_versions() -> dict[str, str]:
    """What made (and what runs) a graph: a graph is used only where these match its own."""
    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"
    return {package: installed(package) for package in ("torch", "onnx", "onnxruntime")}


@dataclass
class Gate:
    """What the export measured of a graph against torch fp32 on the tune split."""

    passed: bool
    messages: int
    max_abs_logit_diff: float
    label_agreement: float  # labels at the operating point (each path's own threshold) equal to fp32's
    why: str = ""  # where it failed: the figure and its bar

    def figures(self) -> str:
        return (f"max |logit - torch fp32| {self.max_abs_logit_diff:.2e}, labels equal to fp32's on "
                f"{self.label_agreement:.2%} of {self.messages:,} messages")


@dataclass
class Graph:
    file: str | None  # None: the gate refused it, and nothing was kept
    sha256: str | None
    gate: Gate


@dataclass
class OnnxExports:
    """The graphs a saved classifier carries: made from the weights of `weights_sha256` by `versions`."""

    weights_sha256: str
    versions: dict[str, str]
    opset: int
    graphs: dict[str, Graph] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "OnnxExports":
        graphs = {path: Graph(graph["file"], graph["sha256"], Gate(**graph["gate"]))
                  for path, graph in record.get("graphs", {}).items()}
        return cls(record["weights_sha256"], dict(record["versions"]), int(record["opset"]), graphs)

    def problem(self, path: str, weights_sha256: str) -> str | None:
        """Why `path` cannot be scored with from these graphs (None: it can)."""
        graph = self.graphs.get(path)
        if graph is None:
            return f"it carries no {path} graph; run `spamray export MODEL DATA` to make one"
        if not graph.gate.passed:
            return f"its {path} graph failed the export's parity gate ({graph.gate.why})"
        if self.weights_sha256 != weights_sha256:
            return ("its ONNX graphs were exported from other weights (the classifier was trained or changed "
                    "since); run `spamray export MODEL DATA` again")
        runtime = runtime_versions()["onnxruntime"]
        if self.versions.get("onnxruntime") != runtime:
            return (f"its {path} graph was gated with onnxruntime {self.versions.get('onnxruntime')}, and this "
                    f"machine has {runtime}; run `spamray export MODEL DATA` again to gate it here")
        return None


def export_problems(metadata: dict) -> dict[str, str | None]:
    """For each ONNX path, why the saved classifier of `metadata` cannot score with it (None: it can)."""
    record = metadata.get("onnx")
    if not record:
        return {path: "it carries no ONNX graphs; run `spamray export MODEL DATA` to make them" for path in ONNX_PATHS}
    exports = OnnxExports.from_dict(record)
    return {path: exports.problem(path, metadata["weights"]["sha256"]) for path in ONNX_PATHS}


# -- making the graphs ------------------------------------------------------------------------------
def export_graphs(classifier) -> dict[str, bytes]:
    """The fp32 and the int8 graph of `classifier` (a TextClassifier in fp32), as ONNX bytes."""
    import torch

    with tempfile.TemporaryDirectory(prefix="spamray-onnx-") as scratch:
        fp32, int8 = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        model = classifier.eval()
        length = min(9, classifier.max_length)  # any example: both dimensions stay dynamic
        example = (torch.randint(0, classifier.cfg.vocab_size, (3, length)),
                   torch.tensor([length, max(1, length // 2), 1]))
        batch = torch.export.Dim("batch")
        tokens = torch.export.Dim("tokens", max=classifier.max_length)
        with warnings.catch_warnings(), torch.inference_mode(False), quiet("torch.onnx"):
            warnings.simplefilter("ignore")  # the exporter's notices about its internals, not about the model
            program = torch.onnx.export(model, example, dynamo=True, opset_version=OPSET, verbose=False,
                                        input_names=["token_ids", "lengths"], output_names=["logits"],
                                        dynamic_shapes={"token_ids": {0: batch, 1: tokens}, "lengths": {0: batch}})
            program.save(str(fp32))
        check_dynamic(fp32)
        quantize_int8(fp32, int8)
        graphs = {"onnx-fp32": fp32.read_bytes(), "onnx-int8": int8.read_bytes()}
    too_large = [path for path, data in graphs.items() if len(data) > MAX_GRAPH_BYTES]
    if too_large:
        raise OnnxExportError(f"the {too_large[0]} graph is {len(graphs[too_large[0]]) / 1e9:.1f} GB, over ONNX's "
                              "2 GB limit for one file: score this classifier with --precision fp32 or bf16")
    return graphs


@contextmanager
def quiet(logger_name: str):
    """Only errors from a library's logger, and its handlers left as they were (the exporter lists
    every operator library it skips; the quantizer's first log call configures the root logger)."""
    logger = logging.getLogger(logger_name)
    level, handlers = logger.level, list(logger.handlers)
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.handlers[:] = handlers


def check_dynamic(path: Path) -> None:
    """The graph's batch and sequence dimensions are names, not the example's sizes."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for tensor in graph.input:
        dims = tensor.type.tensor_type.shape.dim
        fixed = [index for index, dim in enumerate(dims) if not dim.dim_param]
        if fixed:
            raise OnnxExportError(f"the exported graph fixed dimension(s) {fixed} of input {tensor.name!r}; "
                                  "a scoring graph must take any batch and any length")


def quantize_int8(fp32: Path, int8: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings(), quiet("root"):  # ("Please consider to run pre-processing before quantization")
        warnings.simplefilter("ignore")
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, reduce_range=True,
                         op_types_to_quantize=["MatMul", "Gemm"])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- running a graph -------------------------------------------------------------------------------
class OnnxLogits:
    """An ONNX Runtime session of one graph: class logits of padded token ids, on `threads` threads
    (the replica's reserved CPUs; never a pool of one thread per core of the node, ONNX Runtime's
    default). `shares_cores`: the process shares its cores with other work (a Ray replica)."""

    def __init__(self, graph: bytes, threads: int, shares_cores: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Where the cores are shared, threads that finish a parallel region sleep instead of
        # spinning for the next: spinning took CPU from Ray, Serve's ingress and the pipeline's
        # tasks (Serve on 2 Zen 3 cores: 259 vs 228 requests/s at 32 clients). A process that has
        # its cores to itself keeps spinning, which wakes threads sooner (5-15% faster there).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0" if shares_cores else "1")
        self.threads = threads
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def __deepcopy__(self, memo) -> "OnnxLogits":
        return self  # a session runs from any thread; a copy of the classifier shares it

    def __call__(self, token_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        feeds = {"token_ids": np.ascontiguousarray(token_ids, dtype=np.int64),
                 "lengths": np.ascontiguousarray(lengths, dtype=np.int64)}
        return self.session.run(["logits"], feeds)[0]


def load_graph(url: str, metadata: dict, path: str, threads: int, shares_cores: bool = False) -> OnnxLogits:
    """The checked graph of `path` from the saved classifier at `url`: refused, with what to run,
    where it is missing, failed its gate, is stale or was changed after the export."""
    from .saved import SavedClassifierError

    problem = export_problems(metadata)[path]
    if problem:
        raise SavedClassifierError(f"{url} cannot score at {path}: {problem}")
    graph = OnnxExports.from_dict(metadata["onnx"]).graphs[path]
    graph_url = storage.join(url, graph.file)
    if not storage.exists(graph_url):
        raise SavedClassifierError(f"{url} is incomplete: {graph.file} is missing; run `spamray export MODEL DATA`")
    data = storage.read_bytes(graph_url)
    if sha256(data) != graph.sha256:
        raise SavedClassifierError(f"{graph_url} does not match the sha256 recorded in spamray.json: it was changed "
                                   "after the export; run `spamray export MODEL DATA` again")
    return OnnxLogits(data, threads, shares_cores)
