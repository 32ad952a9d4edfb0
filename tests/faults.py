"""Store faults on purpose, for the tests: which requests fail, and how.

A schedule is a list of Faults. Each counts the requests of its kind and area from the moment the
schedule is set, and hits `count` of them in a row starting at the `nth`. The S3 proxy
(faulty_s3.py) and the local-disk layer (faulty_local.py) both decide with `Schedule.decide` and
keep a log of every request, so a test can first count a clean night's requests, then fault each
position in turn.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

# What a store request does, as S3 names it (PUT_IF: a conditional PUT, `If-None-Match: *`, how
# delta-rs commits a log entry). Local disk has no conditional PUT through fsspec.
KINDS = ("GET", "PUT", "PUT_IF", "LIST", "HEAD", "DELETE")
AREAS = ("log", "data")  # the table's _delta_log, and every other object (data files, inputs)
# 500/503: an error answer; reset: the connection cut before the request reaches the store;
# reset_after: cut after the store carried it out (the client never learns it did); timeout: no
# answer until the client gives up; delay: a slow answer that still comes.
ACTIONS = ("500", "503", "reset", "reset_after", "timeout", "delay")


@dataclass
class Fault:
    kind: str  # one of KINDS, or "any"
    nth: int  # the first matching request it hits, counting from 1
    action: str  # one of ACTIONS
    area: str = "any"  # one of AREAS, or "any"
    count: int = 1  # how many matching requests in a row it hits
    seconds: float = 0.0  # how long a delay or a timeout holds the request

    def matches(self, kind: str, area: str) -> bool:
        return self.kind in (kind, "any") and self.area in (area, "any")


@dataclass
class Request:
    kind: str
    area: str
    path: str
    fault: str | None  # the action that hit it


@dataclass
class Schedule:
    faults: list[Fault] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)  # matching requests so far, per fault
    log: list[Request] = field(default_factory=list)

    def __post_init__(self):
        self.seen = self.seen or [0] * len(self.faults)

    def decide(self, kind: str, area: str, path: str) -> Fault | None:
        """The fault that hits this request, if any (the first of the schedule's that does)."""
        hit = None
        for index, fault in enumerate(self.faults):
            if fault.matches(kind, area):
                self.seen[index] += 1
                if hit is None and fault.nth <= self.seen[index] < fault.nth + fault.count:
                    hit = fault
        self.log.append(Request(kind, area, path, hit.action if hit else None))
        return hit

    def to_dict(self) -> dict:
        return {"faults": [asdict(f) for f in self.faults], "seen": self.seen, "log": [asdict(r) for r in self.log]}

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        return cls([Fault(**f) for f in data.get("faults", [])], data.get("seen", []),
                   [Request(**r) for r in data.get("log", [])])


def area_of(path: str) -> str:
    return "log" if "/_delta_log/" in f"/{path}" else "data"


def positions(log: list[Request]) -> list[tuple[str, str, int]]:
    """Every request of a clean run as (kind, area, n): the n-th request of that kind and area."""
    counts: dict[tuple[str, str], int] = {}
    found = []
    for request in log:
        key = (request.kind, request.area)
        counts[key] = counts.get(key, 0) + 1
        found.append((*key, counts[key]))
    return found


def random_schedule(rng: random.Random, log: list[Request], actions: tuple[str, ...], faults: int,
                    longest_burst: int) -> list[Fault]:
    """`faults` faults at positions of a clean run's `log`, each a burst of 1..longest_burst
    requests in a row: bursts longer than a client's retries make a step fail outright."""
    chosen = rng.sample(positions(log), min(faults, len(log)))
    return [Fault(kind, n, rng.choice(actions), area, count=rng.randint(1, longest_burst)) for kind, area, n in chosen]
