"""Fine-tuning on Ray Train: the book's training loop (chapter 6) run by a `TorchTrainer`.

Data flow: prepared Parquet splits -> Ray Data datasets -> each worker's shard ->
`iter_torch_batches` with a collate that tokenizes and pads -> a DDP-wrapped TextClassifier ->
per-epoch metrics and a checkpoint through `ray.train.report` -> on the driver, the final
classifier is evaluated on every split and saved with its metrics and the book's two plots.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path

import torch

from . import storage
from .calibrate import calibrate, check_calibration_data
from .calibration import Calibration
from .classifier import TextClassifier
from .config import TrainConfig
from .driver_actors import ProgressBoard, start_beside_driver
from .evaluate import accuracy_by_split
from .model import count_parameters
from .plots import plot_history
from .precision import TRAINING_SPEED_ORDER, cluster_precision
from .progress import Progress
from .prepare import prepared_digest, read_prepared_labels, split_url
from .tokenizer import get_tokenizer
from .train_checkpoint import read_checkpoint, read_newest_whole, write_checkpoint
from .train_steps import TokenizeAndPad, arriving_within, estimate, gather_digests, training_steps
from .weights import load_gpt2

logger = logging.getLogger(__name__)

POST_PROGRESS_EVERY_S = 0.5


def build_classifier(cfg: TrainConfig, labels: list[str], pad_to: int | None = None) -> TextClassifier:
    gpt = load_gpt2(cfg.weights, cfg.preset, revision=cfg.weights_revision)
    if cfg.drop_rate:
        for module in gpt.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = cfg.drop_rate
        for block in gpt.trf_blocks:
            block.att.drop_rate = cfg.drop_rate
    # `last` pooling reads the padded end: its classifier keeps training's length for every message,
    # longer ones cut to it (the book's validation and test), so scoring reads the same position.
    max_length = pad_to if cfg.pooling == "last" and pad_to else cfg.max_length
    return TextClassifier.from_gpt2(gpt, labels, pooling=cfg.pooling, trainable=cfg.trainable, max_length=max_length,
                                    causal=cfg.causal_mask, pad_to=pad_to if cfg.pooling == "last" else None)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**config["train"])
    labels, pad_to, progress_board = config["labels"], config["pad_to"], config["progress_board"]
    context = ray.train.get_context()
    is_rank_zero = context.get_world_rank() == 0
    torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    classifier = build_classifier(cfg, labels, pad_to)
    state = {"epoch": 0, "global_step": -1, "examples_seen": 0, "resumed_from_epoch": 0,
             "history": {"train_losses": [], "val_losses": [], "examples_seen": [], "train_accs": [], "val_accs": []}}
    checkpoint = ray.train.get_checkpoint()
    saved_optimizer = None
    if checkpoint:
        tensors, saved, warning = read_newest_whole(checkpoint)
        classifier.load_state_dict(tensors)
        saved_optimizer = saved.pop("optimizer")
        state = {**saved, "resumed_from_epoch": saved["epoch"]}
        if warning:  # kept in the state, so that every later report (and the driver) carries it
            state["checkpoint_warnings"] = [*state.get("checkpoint_warnings", []), warning]

    model = ray.train.torch.prepare_model(classifier)
    device = ray.train.torch.get_device()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if saved_optimizer:
        optimizer.load_state_dict(saved_optimizer)

    collate = TokenizeAndPad(classifier.max_length, pad_to)
    train_shard = ray.train.get_dataset_shard("train")
    validation = ray.train.get_dataset_shard("validation")
    world = context.get_world_size()

    # The book estimates validation loss on the first eval_iter batches: read them once.
    validation_batches = list(itertools.islice(arriving_within(
        validation.iter_torch_batches(batch_size=cfg.batch_size, collate_fn=collate, device="cpu"),
        cfg.data_timeout_s, "validation"), cfg.eval_iter))

    if state["epoch"] >= cfg.epochs:  # the run had finished: hand its final state back as the result
        metrics = {key: state[key] for key in ("epoch", "examples_seen", "global_step", "resumed_from_epoch")}
        metrics["checkpoint_warnings"] = state.get("checkpoint_warnings", [])
        report_with_checkpoint({**metrics, "replica_digests": gather_digests(classifier)}, classifier, optimizer,
                               state, is_rank_zero=is_rank_zero)
        return
    history, last_post = state["history"], 0.0
    recent = deque(maxlen=cfg.eval_iter)  # the latest training batches, to estimate train loss
    # bf16 autocast (cfg.precision, resolved by the driver): the weights, their gradients and the
    # optimizer's state stay fp32, so checkpoints and the saved classifier are as in fp32.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        for epoch in range(state["epoch"], cfg.epochs):
            model.train()
            epoch_started, epoch_examples = time.perf_counter(), state["examples_seen"]
            batches = train_shard.iter_torch_batches(batch_size=cfg.batch_size, collate_fn=collate, device="cpu",
                                                     drop_last=True, local_shuffle_buffer_size=4096,
                                                     local_shuffle_seed=cfg.seed + epoch)
            for batch, loss in training_steps(model, optimizer, arriving_within(batches, cfg.data_timeout_s, "training"),
                                              device, cfg.grad_accumulation):
                recent.append(batch)
                state["examples_seen"] += len(batch[2]) * world
                state["global_step"] += 1
                if is_rank_zero and time.monotonic() - last_post >= POST_PROGRESS_EVERY_S:
                    progress_board.post.remote({"step": state["global_step"] + 1, "epoch": epoch + 1, "loss": loss.item(),
                                                "examples_per_second": (state["examples_seen"] - epoch_examples)
                                                / (time.perf_counter() - epoch_started)})
                    last_post = time.monotonic()
                if state["global_step"] % cfg.eval_freq == 0:
                    history["train_losses"].append(estimate(model, recent, device)[0])
                    history["val_losses"].append(estimate(model, validation_batches, device)[0])
                    history["examples_seen"].append(state["examples_seen"])
            train_loss, train_acc = estimate(model, recent, device)
            val_loss, val_acc = estimate(model, validation_batches, device)
            examples_per_second = (state["examples_seen"] - epoch_examples) / (time.perf_counter() - epoch_started)
            history["train_accs"].append(train_acc)
            history["val_accs"].append(val_acc)
            state["epoch"] = epoch + 1
            metrics = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "train_argmax_accuracy": train_acc,
                       "val_argmax_accuracy": val_acc, "examples_seen": state["examples_seen"],
                       "global_step": state["global_step"], "resumed_from_epoch": state["resumed_from_epoch"],
                       "examples_per_second": examples_per_second,
                       "checkpoint_warnings": state.get("checkpoint_warnings", [])}
            if epoch + 1 == cfg.epochs:
                metrics["replica_digests"] = gather_digests(classifier)
            report_with_checkpoint(metrics, classifier, optimizer, state, is_rank_zero=is_rank_zero)


def report_with_checkpoint(metrics: dict, classifier: TextClassifier, optimizer, state: dict, is_rank_zero: bool) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if is_rank_zero:  # replicas are identical; one copy is enough
            write_checkpoint(Path(folder), classifier.state_dict(), {**state, "optimizer": optimizer.state_dict()})
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


@contextlib.contextmanager
def showing_progress(board, progress: Progress, epochs: int, every_s: float = 0.5):
    """Shows what the rank-0 worker posts to `board` while the block runs (on the driver)."""
    import ray

    stop = threading.Event()

    def show() -> None:
        while not stop.wait(every_s):
            state = ray.get(board.read.remote())
            if state:
                progress.update(state["step"], epoch=f"{state['epoch']}/{epochs}", loss=state["loss"],
                                examples_per_s=round(state["examples_per_second"]))

    watcher = threading.Thread(target=show, daemon=True, name="training progress")
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        progress.close()


def training_datasets(data: str) -> dict:
    """The train and validation splits as Ray datasets whose blocks this driver put in the
    object store: they live on the driver's node, and no task made them. A read task's blocks on
    a worker node that is lost must be rebuilt by running the read again, and a read asks for a
    CPU, which the training workers hold (on a cluster whose head runs no work, all of them):
    nothing could run it, and the workers would wait for their data until --data-timeout-s.
    The splits are small (the book's train split is 1,045 messages); the driver reads them once."""
    import pandas as pd
    import ray.data

    return {name: ray.data.from_pandas(pd.read_parquet(split_url(data, name), columns=["text", "label"]))
            for name in ("train", "validation")}


def default_run_name(cfg: TrainConfig, data_digest: str) -> str:
    """The same training settings on the same data give the same name, so starting them again
    resumes the same run (where the classifier and checkpoints go, and how failures are handled,
    are not training settings). The data counts by content (`prepared_digest`), not by path: a
    folder prepared again is a new run, never an earlier run's result handed back."""
    ignored = ("output", "overwrite", "storage_path", "shared_storage", "run_name", "max_failures", "data_timeout_s")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ignored} | {"data": data_digest}
    return "spamray-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def longest_training_example(data: str, max_length: int) -> int:
    import pandas as pd

    texts = pd.read_parquet(split_url(data, "train"), columns=["text"])["text"].tolist()
    return max(len(ids) for ids in get_tokenizer().encode_batch(texts, max_length=max_length))


def check_storage_path(storage_path: str | None, nodes: int, shared: bool) -> None:
    """On a cluster of several nodes, checkpoints must go where every node reaches them: a
    worker restarted on another node resumes from them, and the driver reads the final one."""
    if nodes > 1 and not shared and (storage_path is None or storage.is_local(storage_path)):
        where = storage_path or "~/ray_results (the default)"
        raise ValueError(f"--storage-path {where} is on each node's own disk, and this cluster has {nodes} nodes: "
                         "a worker restarted elsewhere could not resume, nor the driver read the result. Give a URL "
                         "every node reaches (s3://..., gs://...), or pass --shared-storage if the path is a mount "
                         "all nodes share (NFS)")


def train(cfg: TrainConfig) -> dict:
    """Runs the TorchTrainer, then evaluates and saves the final classifier; returns its metrics."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    labels = read_prepared_labels(cfg.data)
    if storage.exists(cfg.output) and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output} already exists; choose another --output or pass --overwrite")
    probe = build_classifier(cfg, labels)  # fails here, before any Ray work, on bad weights or options
    check_calibration_data(cfg.data, labels, cfg.target_fpr, cfg.prior)
    logger.info(f"model: {cfg.weights} ({probe.cfg.emb_dim}-wide, {probe.cfg.n_layers} blocks), trainable {cfg.trainable}: "
        f"{count_parameters(probe, trainable_only=True):,} of {count_parameters(probe):,} parameters")
    pad_to = None  # --padding batch: each batch to its own longest message
    if cfg.padding == "longest":
        pad_to = longest_training_example(cfg.data, probe.max_length)
    elif cfg.padding == "context":
        pad_to = probe.max_length
    del probe

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    choice = cluster_precision(cfg.precision, order=TRAINING_SPEED_ORDER)
    cfg = replace(cfg, precision=choice.precision)  # the run's name and record hold what it computes in
    run_name = cfg.run_name or default_run_name(cfg, prepared_digest(cfg.data))
    storage_path = cfg.storage_path or str(Path.home() / "ray_results")
    check_storage_path(cfg.storage_path, sum(node["Alive"] for node in ray.nodes()), cfg.shared_storage)
    datasets = training_datasets(cfg.data)
    progress_board = start_beside_driver(ProgressBoard)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": asdict(cfg), "labels": labels, "pad_to": pad_to, "progress_board": progress_board},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=run_name, storage_path=storage_path,
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    logger.info(f"Ray Train run {run_name!r} in {storage_path} ({cfg.num_workers} workers, gpu={use_gpu}, "
                f"{cfg.precision}: {choice.reason})")
    steps = cfg.epochs * (datasets["train"].count() // cfg.num_workers // cfg.batch_size)
    with showing_progress(progress_board, Progress("training", steps, "steps", logger), cfg.epochs):
        result = trainer.fit()
    ray.kill(progress_board)
    if result.error:
        raise result.error
    for warning in result.metrics.get("checkpoint_warnings", []):
        logger.warning(warning)
    classifier = build_classifier(cfg, labels, pad_to)
    tensors, final_state = read_checkpoint(result.checkpoint)
    classifier.load_state_dict(tensors)
    history = final_state["history"]
    classifier.eval()
    record = {"training": result.metrics, "history": history,
              "settings": {**asdict(cfg), "run_name": run_name, "storage_path": storage_path}}
    return calibrate_and_save(classifier, cfg, record, plot_history(history, cfg.epochs, final_state["examples_seen"]))


def calibrate_and_save(classifier: TextClassifier, cfg: TrainConfig, record: dict, extra_files: dict[str, bytes]) -> dict:
    """Calibrates the trained classifier, then saves it with its metrics; returns them. A
    calibration that fails loses no training: the classifier is saved uncalibrated first (it
    labels by the most probable class), and the log says how to calibrate it."""
    try:
        calibration = calibrate(classifier, cfg.data, cfg.target_fpr, cfg.prior)
    except Exception as error:
        classifier.set_calibration(Calibration(positive=classifier.positive))
        classifier.metrics = {**record, "calibration": {"failed": f"{type(error).__name__}: {error}"}}
        classifier.save(cfg.output, overwrite=cfg.overwrite, extra_files=extra_files)
        logger.error(f"training finished but calibration failed; the trained classifier is saved UNCALIBRATED to "
                     f"{cfg.output} (labels by the most probable class). Calibrate it with: spamray calibrate "
                     f"{cfg.output} {cfg.data}")
        raise
    metrics = {**accuracy_by_split(classifier, cfg.data), "calibration": calibration, **record}
    classifier.metrics = metrics
    classifier.save(cfg.output, overwrite=cfg.overwrite, extra_files=extra_files)
    logger.info("argmax accuracy: " + ", ".join(f"{split} {metrics[f'{split}_argmax_accuracy']:.2%}"
                                                for split in ("train", "validation", "test"))
                + (f"; at the operating point: test {metrics['test_accuracy_at_threshold']:.2%}"
                   if "test_accuracy_at_threshold" in metrics else ""))
    logger.info(f"classifier saved to {cfg.output} (with loss.png and accuracy.png)")
    return metrics
