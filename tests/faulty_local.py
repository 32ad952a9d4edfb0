"""Local disk that fails on purpose: an fsspec filesystem in place of fsspec's own for file://
paths, which asks the fault schedule (faults.py) before each request and fails, delays or
half-does the ones it picks. spamray reaches local disk through fsspec, so every read, write,
listing and delete of its own goes through here (delta-rs writes its log through its own Rust
object store, which this cannot reach: on local disk the log's requests are not faulted).

The schedule lives in a file under $SPAMRAY_TEST_FAULTS, shared by the test, the driver and every
Ray worker (`install` runs in each as Ray's worker_process_setup_hook); without that file every
request passes straight through.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from faults import Fault, Request, Schedule, area_of

CONTROL = "SPAMRAY_TEST_FAULTS"
_depth = threading.local()  # a request made inside another (find calls ls) counts once


def control_folder() -> Path | None:
    folder = os.environ.get(CONTROL)
    return Path(folder) if folder else None


@contextmanager
def locked_schedule():
    """The schedule, read and written back under an exclusive lock (None: no schedule set)."""
    folder = control_folder()
    if folder is None or not (folder / "schedule.json").exists():
        yield None
        return
    with open(folder / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            schedule = Schedule.from_dict(json.loads((folder / "schedule.json").read_text()))
            yield schedule
            (folder / "schedule.json").write_text(json.dumps(schedule.to_dict()))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def set_schedule(faults: list[Fault]) -> None:
    folder = control_folder()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (folder / "schedule.json").write_text(json.dumps(Schedule(faults).to_dict()))
        fcntl.flock(lock, fcntl.LOCK_UN)


def request_log() -> list[Request]:
    with locked_schedule() as schedule:
        return list(schedule.log) if schedule else []


def clear_schedule() -> None:
    folder = control_folder()
    if folder is not None and (folder / "schedule.json").exists():
        (folder / "schedule.json").unlink()


def fault_for(kind: str, path: str) -> Fault | None:
    if getattr(_depth, "value", 0):
        return None
    with locked_schedule() as schedule:
        return schedule.decide(kind, area_of(path), path) if schedule else None


class InjectedFault(OSError):
    pass


class FaultyLocalFileSystem(LocalFileSystem):
    """LocalFileSystem, with each public request asking the schedule first."""

    def _request(self, kind: str, path, operation, *args, **kwargs):
        fault = fault_for(kind, str(path))
        action = fault.action if fault else None
        if action in ("delay", "timeout"):
            time.sleep(fault.seconds)
        if action == "timeout":
            raise TimeoutError(errno.ETIMEDOUT, f"injected timeout: {kind} {path}")
        if action in ("500", "503", "reset"):
            raise InjectedFault(errno.EIO, f"injected {action}: {kind} {path}")
        _depth.value = getattr(_depth, "value", 0) + 1
        try:
            result = operation(*args, **kwargs)
        finally:
            _depth.value -= 1
        if action == "reset_after":
            if hasattr(result, "close") and kind == "PUT":  # a file being written: done on close, then the error
                return _FailsAfterClose(result, f"injected reset after {kind} {path}")
            raise InjectedFault(errno.ECONNRESET, f"injected reset after: {kind} {path}")
        return result

    def _open(self, path, mode="rb", *args, **kwargs):
        kind = "GET" if "r" in mode and "+" not in mode else "PUT"
        return self._request(kind, path, super()._open, path, mode, *args, **kwargs)

    def cat_file(self, path, *args, **kwargs):
        return self._request("GET", path, super().cat_file, path, *args, **kwargs)

    def pipe_file(self, path, *args, **kwargs):
        return self._request("PUT", path, super().pipe_file, path, *args, **kwargs)

    def put_file(self, path1, path2, *args, **kwargs):
        return self._request("PUT", path2, super().put_file, path1, path2, *args, **kwargs)

    def mv(self, path1, path2, *args, **kwargs):
        return self._request("PUT", path2, super().mv, path1, path2, *args, **kwargs)

    def info(self, path, **kwargs):
        return self._request("HEAD", path, super().info, path, **kwargs)

    def exists(self, path, **kwargs):
        return self._request("HEAD", path, super().exists, path, **kwargs)

    def isdir(self, path):
        return self._request("HEAD", path, super().isdir, path)

    def isfile(self, path):
        return self._request("HEAD", path, super().isfile, path)

    def size(self, path):
        return self._request("HEAD", path, super().size, path)

    def ls(self, path, *args, **kwargs):
        return self._request("LIST", path, super().ls, path, *args, **kwargs)

    def find(self, path, *args, **kwargs):
        return self._request("LIST", path, super().find, path, *args, **kwargs)

    def glob(self, path, *args, **kwargs):
        return self._request("LIST", path, super().glob, path, *args, **kwargs)

    def rm(self, path, *args, **kwargs):
        return self._request("DELETE", path if isinstance(path, str) else ",".join(path), super().rm, path,
                             *args, **kwargs)

    def rm_file(self, path):
        return self._request("DELETE", path, super().rm_file, path)


class _FailsAfterClose:
    """A file being written whose close writes it and then reports an error, as a connection cut
    after the store took the upload."""

    def __init__(self, handle, message: str):
        self._handle, self._message = handle, message

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._handle.close()
        raise InjectedFault(errno.ECONNRESET, self._message)


def install() -> None:
    """file:// and plain paths through FaultyLocalFileSystem, in this process."""
    for protocol in ("file", "local"):
        fsspec.register_implementation(protocol, FaultyLocalFileSystem, clobber=True)
