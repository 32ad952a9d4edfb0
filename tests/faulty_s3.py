"""An S3 endpoint that fails on purpose: a proxy on 127.0.0.1 in front of moto's server that
passes every request through, except those its fault schedule (faults.py) picks, which it answers
with a 500 or a 503 SlowDown, cuts (before or after moto carried them out), holds past the
client's timeout, or delays.

It runs in a process of its own, like moto. Tests set its schedule and read its request log over
HTTP at /__faults__ (no bucket can be named so); `FaultyS3` does that.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, str(Path(__file__).parent))
from faults import Fault, Request, Schedule, area_of  # noqa: E402

CONTROL = "/__faults__"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate", "content-length"}
ERRORS = {"500": (500, "InternalError", "We encountered an internal error. Please try again."),
          "503": (503, "SlowDown", "Please reduce your request rate.")}


def request_kind(method: str, target: str, headers) -> str:
    """GET, PUT, PUT_IF, LIST, HEAD or DELETE, as faults.KINDS names them."""
    url = urlsplit(target)
    query = parse_qs(url.query, keep_blank_values=True)
    has_key = len([part for part in url.path.split("/") if part]) > 1
    if method == "HEAD":
        return "HEAD"
    if method == "GET":
        return "GET" if has_key and "uploads" not in query and "list-type" not in query else "LIST"
    if method == "DELETE" or (method == "POST" and "delete" in query):
        return "DELETE"
    if method == "PUT" and (headers.get("If-None-Match") or headers.get("If-Match")):
        return "PUT_IF"
    return "PUT"  # PUT, and POST of multipart uploads


def object_path(target: str) -> str:
    """/bucket/key, or for a listing /bucket/prefix: what the request is about."""
    url = urlsplit(target)
    prefix = parse_qs(url.query).get("prefix", [""])[0]
    return f"{url.path.rstrip('/')}/{prefix}" if prefix else url.path


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int]
    schedule = Schedule()
    lock = threading.Lock()
    local = threading.local()

    def log_message(self, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no waiting on small writes

    def do_GET(self):
        self.handle_any()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

    def handle_any(self) -> None:
        body = self.read_body()
        if self.path.startswith(CONTROL):
            return self.control(body)
        kind, path = request_kind(self.command, self.path, self.headers), object_path(self.path)
        with Proxy.lock:
            fault = Proxy.schedule.decide(kind, area_of(path), path)
        action = fault.action if fault else None
        if action in ERRORS:
            return self.answer_error(*ERRORS[action])
        if action == "reset":
            return self.cut()
        if action == "timeout":
            time.sleep(fault.seconds)
            return self.cut()
        if action == "delay":
            time.sleep(fault.seconds)
        status, headers, answer = self.forward(body)
        if action == "reset_after":
            return self.cut()
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        length = dict((k.lower(), v) for k, v in headers).get("content-length")
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(answer)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer)

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def forward(self, body: bytes) -> tuple[int, list, bytes]:
        headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a kept-alive upstream connection can have been closed meanwhile
            connection = getattr(Proxy.local, "connection", None) or upstream_connection()
            Proxy.local.connection = connection
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.getheaders(), response.read()
            except (http.client.HTTPException, OSError):
                connection.close()
                Proxy.local.connection = None
                if attempt:
                    raise

    def answer_error(self, status: int, code: str, message: str) -> None:
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
               f"<RequestId>injected-fault</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def cut(self) -> None:
        """Closes the connection with a reset and no answer."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def control(self, body: bytes) -> None:
        if self.command == "PUT":
            with Proxy.lock:
                Proxy.schedule = Schedule([Fault(**f) for f in json.loads(body or b"{}").get("faults", [])])
            answer = b"{}"
        else:
            with Proxy.lock:
                answer = json.dumps(Proxy.schedule.to_dict()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def finish(self):
        try:
            super().finish()
        except OSError:  # a connection this proxy cut on purpose
            pass


def upstream_connection() -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection(*Proxy.upstream, timeout=60)
    connection.connect()
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


class FaultyS3:
    """The proxy in a process of its own, in front of the S3 endpoint at `upstream`."""

    def __init__(self, upstream: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, __file__, upstream, str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                self.log()
                return
            except OSError:
                if time.time() > deadline or self.process.poll() is not None:
                    self.process.kill()
                    raise RuntimeError("the faulty S3 proxy did not start")
                time.sleep(0.1)

    def set(self, faults: list[Fault]) -> None:
        """A new schedule; its counts and log start from zero."""
        data = json.dumps({"faults": [vars(f) for f in faults]}).encode()
        urllib.request.urlopen(urllib.request.Request(self.endpoint + CONTROL, data=data, method="PUT"), timeout=10)

    def log(self) -> list[Request]:
        with urllib.request.urlopen(self.endpoint + CONTROL, timeout=10) as answer:
            return Schedule.from_dict(json.loads(answer.read())).log

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def serve(upstream: str, port: int) -> None:
    url = urlsplit(upstream)
    Proxy.upstream = (url.hostname, url.port)
    server = ThreadingHTTPServer(("127.0.0.1", port), Proxy)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
