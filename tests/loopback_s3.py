"""moto's S3 server on 127.0.0.1 in a process of its own, for the tests and the benchmarks.

Its own process, not a thread here: a delta-rs call that holds the GIL while it waits for the
answer would starve a server thread in the same process (seen: is_deltatable timed out)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def start_s3_endpoint() -> tuple[subprocess.Popen, dict[str, str]]:
    """(the server process, the standard settings that point s3fs, pyarrow and delta-rs at it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto's S3 server did not start")
            time.sleep(0.2)
    return server, {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
