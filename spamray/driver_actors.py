"""Small Ray actors that share a run's state between its workers and its driver, placed on the
driver's node (no CPU): they are lost only when the driver is, and go when the run ends; and
the turn that lets one scoring run at a time use a cluster."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def start_beside_driver(actor_class: type, *args, **options):
    """An actor of `actor_class` on this process's node; `ray.kill` it when the run is over.
    `options` are Ray's actor options (a name, its namespace)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(actor_class).options(scheduling_strategy=here, **options).remote(*args)


class BatchCrashes:
    """How many times each scoring batch has crashed its replica, across replica restarts: a
    replica reports each batch's start and finish (see replica.MAX_BATCH_CRASHES). Crashes are
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


class RunLedger:
    """A scoring run's shared counts in one actor (one process fewer beside the replicas, which on
    a small node compete with it for cores): each batch's starts and finishes for its replicas
    (`BatchCrashes`), and the rows its writer tasks have written, for the driver's progress bar."""

    def __init__(self):
        self.crashes, self.rows = BatchCrashes(), 0

    def start(self, batch_key: str) -> int:
        return self.crashes.start(batch_key)

    def finish(self, batch_key: str) -> None:
        self.crashes.finish(batch_key)

    def add(self, rows: int) -> None:
        self.rows += rows

    def total(self) -> int:
        return self.rows


class ScoringTurn(RunLedger):
    """The one scoring run a Ray cluster runs at a time (see `scoring_turn`), which also keeps that
    run's ledger: one actor a run."""

    def __init__(self, run: str):
        super().__init__()
        self.run = run

    def holder(self) -> str:
        return self.run


# Runs on one cluster take turns: each run's replicas reserve CPUs and wait for rows from read
# tasks that need CPUs too, so two runs whose replicas fill the cluster would wait on each other
# for ever. A named actor is the turn: Ray refuses a second live actor of that name, and the
# actor belongs to its run's driver and lives on the driver's node, so it goes when the run
# ends, is killed, or loses its driver.
TURN_NAME, TURN_NAMESPACE = "spamray-scoring", "spamray"
TURN_POLL_S = 2.0
TURN_ANSWER_S = 300.0  # a new actor on the driver's node answers in seconds; Ray has once never delivered the call


@contextmanager
def scoring_turn(run: str, log: Callable[[str], None]) -> Iterator:
    """Waits until no other scoring run on this Ray cluster holds the turn, then holds it for
    the `with` block, which gets the turn's actor: the run's ledger. `run` names this run in the
    log of a run that waits for it."""
    import ray

    waited_for = None
    while True:
        try:
            turn = start_beside_driver(ScoringTurn, run, name=TURN_NAME, namespace=TURN_NAMESPACE)
            break
        except ValueError:  # the name is taken: another run's turn
            holder = turn_holder()
            if holder is not None and holder != waited_for:
                log(f"waiting for the scoring run before this one to finish ({holder}): runs on one Ray cluster "
                    "take turns")
                waited_for = holder
            time.sleep(TURN_POLL_S)
    try:
        try:
            ray.get(turn.holder.remote(), timeout=TURN_ANSWER_S)
        except ray.exceptions.GetTimeoutError as error:  # seen once in a test session: an error, not a hang
            raise RuntimeError(f"the scoring turn's actor, created beside this driver, did not answer in "
                               f"{TURN_ANSWER_S:g} s; nothing was scored: run again") from error
        yield turn
    finally:
        ray.kill(turn)


def turn_holder() -> str | None:
    """The run holding the turn, if any (it may end while asked)."""
    import ray

    try:
        return ray.get(ray.get_actor(TURN_NAME, namespace=TURN_NAMESPACE).holder.remote(), timeout=30)
    except (ValueError, ray.exceptions.RayError):  # gone meanwhile, or going with its driver
        return None
