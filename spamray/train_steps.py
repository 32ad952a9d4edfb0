"""The training step in plain PyTorch, apart from Ray Train's driver (train.py): a batch tokenized
and padded, its loss, gradients accumulated over several batches (and all-reduced by hand where
DDP's own sync is skipped), the weights' digest that shows DDP replicas stay identical, and a
watchdog on the data that feeds a worker."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from .errors import SpamrayError
from .tokenizer import get_tokenizer


class TokenizeAndPad(NumpyBatchCollateFn):
    """Tokenizes and right-pads a batch of {"text", "label"} to (ids, lengths, labels) tensors."""

    def __init__(self, max_length: int, pad_to: int | None):
        self.max_length, self.pad_to = max_length, pad_to

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Padded to a fixed length, longer messages are cut to it (the book's validation and test).
        rows = get_tokenizer().encode_batch(list(batch["text"]), max_length=self.pad_to or self.max_length)
        ids, lengths = get_tokenizer().pad(rows, length=self.pad_to)
        return torch.from_numpy(ids), torch.from_numpy(lengths), torch.tensor(batch["label"], dtype=torch.long)


def batch_loss(model, batch, device) -> tuple[torch.Tensor, int]:
    ids, lengths, labels = (t.to(device) for t in batch)
    logits = model(ids, lengths)
    correct = int((logits.argmax(dim=-1) == labels).sum())
    return torch.nn.functional.cross_entropy(logits, labels), correct


@torch.no_grad()
def estimate(model, batches, device) -> tuple[float, float]:
    """Mean loss and accuracy over a few batches, in eval mode (the book's calc_*_loader)."""
    model.eval()
    losses, correct, seen = [], 0, 0
    for batch in batches:
        loss, right = batch_loss(model, batch, device)
        losses.append(loss.item())
        correct += right
        seen += len(batch[2])
    model.train()
    return float(np.mean(losses)) if losses else float("nan"), correct / max(seen, 1)


class DataStalled(SpamrayError, RuntimeError):
    """No batch arrived in time: the data pipeline feeding a worker has stalled."""


def arriving_within(batches: Iterable, timeout_s: float, what: str) -> Iterator:
    """Yields `batches`, raising DataStalled when the next one takes longer than `timeout_s` to
    arrive. A stalled pipeline then fails the attempt, which Ray Train retries from the last
    checkpoint (--max-failures), instead of a run that waits for ever. Only the waits count,
    not the training steps between them."""
    arrived: queue.Queue = queue.Queue(maxsize=2)
    finished, stop = object(), threading.Event()

    def fetch() -> None:
        try:
            for item in itertools.chain(batches, [finished]):
                while not stop.is_set():
                    try:
                        arrived.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            arrived.put(error)

    threading.Thread(target=fetch, daemon=True, name=f"fetch {what}").start()
    try:
        while True:
            try:
                item = arrived.get(timeout=timeout_s)
            except queue.Empty:
                raise DataStalled(f"no {what} batch arrived in {timeout_s:g} s: the data pipeline feeding this worker "
                                  "has stalled. Ray Train retries from the last checkpoint (--max-failures); if it "
                                  "stalls again, look at the Ray Data logs, or raise --data-timeout-s for data "
                                  "that is slow to arrive") from None
            if item is finished:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def training_steps(model, optimizer, batches: Iterable, device, accumulation: int = 1) -> Iterator:
    """Yields (batch, loss) as each batch is learnt from: gradients of loss / `accumulation`
    add up over `accumulation` batches, then one optimizer step (and one after the last batch
    if some are left), the same update as one batch that many times larger. Between steps a
    DDP model skips its gradient all-reduce (`no_sync`)."""
    pending = 0
    optimizer.zero_grad()
    for batch in batches:
        pending += 1
        stepping = pending == accumulation
        skip_sync = model.no_sync() if hasattr(model, "no_sync") and not stepping else contextlib.nullcontext()
        with skip_sync:
            loss, _ = batch_loss(model, batch, device)
            (loss / accumulation).backward()
        if stepping:
            optimizer.step()
            optimizer.zero_grad()
            pending = 0
        yield batch, loss
    if pending:  # the epoch ended inside a group: its gradients stayed on each worker (no_sync)
        average_gradients_across_workers(model)
        optimizer.step()
        optimizer.zero_grad()


def average_gradients_across_workers(model) -> None:
    """What DDP's all-reduce does at a synchronised backward pass, for gradients gathered under
    `no_sync`: without it, each worker would step with its own and the replicas would part."""
    if not (hasattr(model, "no_sync") and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for parameter in model.parameters():
        if parameter.grad is not None:
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad /= world


def gather_digests(model: torch.nn.Module) -> list[str]:
    """Every worker's weights digest: DDP keeps replicas identical, and this shows it."""
    digest = weights_digest(model)
    if not torch.distributed.is_initialized():
        return [digest]
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)
    return digests
