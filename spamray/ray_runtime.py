"""Ray at spamray's edges: joining or starting Ray, and the logging that keeps a run's terminal
readable (spamray's own lines on stdout, Ray's only with --verbose)."""

from __future__ import annotations

import logging
import os
import sys


class SpamrayFormatter(logging.Formatter):
    """spamray's own lines as they are; warnings say so (errors begin with what failed: "FAILED …")."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return f"warning: {message}" if record.levelno == logging.WARNING else message


class StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a line is logged."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


def setup_logging(verbose: bool) -> None:
    """spamray's messages go to stdout through `logging`; Ray's INFO lines only with --verbose
    (they are always in Ray's own log files under /tmp/ray/session_*/logs)."""
    handler = StdoutHandler()
    handler.setFormatter(SpamrayFormatter("%(message)s"))
    ours = logging.getLogger("spamray")
    ours.handlers[:] = [handler]
    ours.setLevel(logging.INFO)
    global RAY_VERBOSE
    RAY_VERBOSE = verbose


RAY_VERBOSE = False
# Notices Ray logs as warnings that say nothing wrong about a spamray run: that token
# authentication is on (as it should be), and that Ray Data's bars are off (spamray shows its own).
RAY_NOTICES = {
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray cluster",
    "ray.data._internal.progress": "Progress bars disabled",
}


class DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def start_ray() -> None:
    """Joins the cluster in RAY_ADDRESS (as under `ray job submit`), or starts local Ray
    in-process. Quiet unless --verbose: Ray's INFO lines, Ray Data's progress bars and the
    workers' output stay in Ray's log files (spamray shows its own progress)."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    level = logging.INFO if RAY_VERBOSE else logging.WARNING
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(level)
    if not RAY_VERBOSE:
        for name, prefix in RAY_NOTICES.items():
            logging.getLogger(name).addFilter(DropNotice(prefix))
    ray.data.DataContext.get_current().enable_progress_bars = RAY_VERBOSE
    options = {"log_to_driver": RAY_VERBOSE, "logging_level": level}
    if not os.environ.get("RAY_ADDRESS"):
        options["include_dashboard"] = False
    ray.init(**options)
