"""What a person sees: `spamray demo` on a terminal (a pseudo-terminal here) shows progress bars
and stays short; Ray's own lines stay in its log files unless --verbose."""

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A line of Ray's own: its C++ log format, its Python log format, or a line its workers forward.
RAY_LINE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] \S+:\d+:"
                      r"|\d{4}-\d\d-\d\d [\d:,]+\s+(DEBUG|INFO|WARNING|ERROR)\s+\S+\.py:\d+ --"
                      r"|\((raylet|pid=\d+|\w+ pid=\d+)\)")
# The one Ray line allowed: Ray Data's actor pool passes its replicas' map function by object
# reference, and Ray's C++ core worker says so at ERROR level on stderr, once a process
# (ray-project/ray#53727). Ray 2.60 has no setting that moves that one line off the terminal
# without hiding every other error: docs/demo.md.
ALLOWED_RAY_LINE = re.compile(r"\] core_worker\.cc:\d+: Actor with class name: 'MapWorker\(MapBatches\(Scorer\)\)' "
                              r"and ID: '[0-9a-f]+' has constructor arguments in the object store and max_restarts > 0")


def run_on_a_terminal(args: list[str], timeout_s: float = 600) -> tuple[int, str]:
    """Runs `spamray ARGS` with stdin, stdout and stderr on a 120x40 pseudo-terminal; returns
    (exit status, everything it wrote)."""
    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-m", "spamray.cli", *args], stdin=secondary, stdout=secondary,
                               stderr=secondary, env=env, start_new_session=True)
    os.close(secondary)
    chunks, deadline, ended_at = [], time.time() + timeout_s, None
    # Read until spamray has exited (and a moment more for what it wrote last): Ray's helper
    # processes can hold the terminal open for a while after the driver is gone.
    while time.time() < deadline and (ended_at is None or time.time() < ended_at + 1):
        if select.select([main], [], [], 0.2)[0]:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif ended_at is None and process.poll() is not None:
            ended_at = time.time()
    code = process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # its own session: whatever of Ray is left
    os.close(main)
    return code, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_the_demo_on_a_terminal_shows_progress_bars_and_stays_short(tmp_path):
    code, output = run_on_a_terminal(["demo", "--preset", "gpt2-tiny", "--epochs", "1", "--workdir", str(tmp_path)])
    assert code == 0, output[-3000:]
    frames = ANSI.sub("", output).split("\r")
    assert any(re.search(r"training: +\d+%\|.*\| \d+/130 .*epoch=1/1, loss=", f) for f in frames)
    assert any(re.search(r"scoring: +\d+%\|.*\| \d+/5574 ", f) for f in frames)
    lines = [line for line in output.replace("\r", "\n").split("\n")
             if line.strip() and not re.match(r"^\s*(training|scoring):", ANSI.sub("", line))]
    print(f"{len(lines)} lines besides progress frames")
    assert len(lines) <= 60, "\n".join(lines)
    ray_lines = [line for line in ANSI.sub("", output).replace("\r", "\n").split("\n") if RAY_LINE.search(line)]
    assert all(ALLOWED_RAY_LINE.search(line) for line in ray_lines), "\n".join(ray_lines)
    assert len(ray_lines) <= 1
    for noise in ("PlacementGroupCleaner", "RayDeprecationWarning", "tqdm is not installed", "Token authentication is",
                  "non-writable", "INFO"):
        assert noise not in output
    assert "done in" in output and "test argmax accuracy" in output
