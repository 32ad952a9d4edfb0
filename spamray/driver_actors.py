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


class BatchCrashes:
    """How many times each scoring batch has crashed its replica, across replica restarts: a
    replica reports each batch's start and finish (see score.MAX_BATCH_CRASHES). Crashes are
    starts that never finished: when Ray Data retries a whole task of several batches after one
    of them crashed, the batches before it start again, but they had finished, so they are not
    counted against."""

    def __init__(self):
        self.started, self.finished = Counter(), Counter()

    def start(self, batch_key: str) -> int:
        """Records a start; returns the batch's crashes before it."""
        crashes = self.started[batch_key] - self.finished[batch_key]
        self.started[batch_key] += 1
        return crashes

    def finish(self, batch_key: str) -> None:
        self.finished[batch_key] += 1


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
