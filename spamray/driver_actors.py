"""Small Ray actors that share a run's state between its workers and its driver, placed on the
driver's node (no CPU): they are lost only when the driver is, and go when the run ends."""

from __future__ import annotations

from collections import Counter


def start_beside_driver(actor_class: type):
    """An actor of `actor_class` on this process's node; `ray.kill` it when the run is over."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(actor_class).options(scheduling_strategy=here).remote()


class BatchStarts:
    """How many times each scoring batch has been started, across replica restarts: every
    replica asks before it scores a batch (see score.MAX_BATCH_STARTS)."""

    def __init__(self):
        self.starts = Counter()

    def start(self, batch_key: str) -> int:
        self.starts[batch_key] += 1
        return self.starts[batch_key]


class ProgressBoard:
    """The latest progress a training worker posted, for the driver to show."""

    def __init__(self):
        self.state: dict = {}

    def post(self, state: dict) -> None:
        self.state = state

    def read(self) -> dict:
        return self.state


class RowsWritten:
    """Rows the scoring run's writer tasks have written so far, for the driver's progress bar."""

    def __init__(self):
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def total(self) -> int:
        return self.rows
