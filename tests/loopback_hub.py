"""A Hugging Face hub on loopback for download tests: serves files at a commit the way the hub
does for `hf_hub_download` (HEAD with X-Repo-Commit and an ETag that is the file's sha256 for
large files or its git blob sha1 for small ones, GET with Range), and answers an unknown
revision with the hub's RevisionNotFound error."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LoopbackHub:
    """`repos[repo_id][commit][filename] = bytes`; `corrupt[(repo_id, commit, filename)] = bytes`
    serves other bytes (of the same length) under the true file's ETag."""

    def __init__(self):
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.corrupt: dict[tuple[str, str, str], bytes] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.respond(send_body=False)

            def do_GET(self):
                self.respond(send_body=True)

            def respond(self, send_body: bool):
                hub.requests.append(f"{self.command} {self.path}")
                found = hub.lookup(self.path)
                if isinstance(found, str):  # an error code the hub sends
                    self.send_response(404)
                    self.send_header("X-Error-Code", found)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                commit, true_bytes, served = found
                etag = hashlib.sha256(true_bytes).hexdigest() if len(true_bytes) > 1024 else git_blob_sha1(true_bytes)
                start = 0
                ranged = self.headers.get("Range")
                if send_body and ranged and ranged.startswith("bytes="):
                    start = int(ranged[len("bytes="):].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Content-Length", str(len(served) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(served) - 1}/{len(served)}")
                self.end_headers()
                if send_body:
                    self.wfile.write(served[start:])

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def lookup(self, path: str):
        """(commit, true bytes, served bytes) for /{owner}/{name}/resolve/{revision}/{file}, or
        the hub's error code."""
        parts = path.split("?")[0].strip("/").split("/")
        if len(parts) != 5 or parts[2] != "resolve":
            return "EntryNotFound"
        repo, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], parts[4]
        if repo not in self.repos:
            return "RepoNotFound"
        if revision not in self.repos[repo]:
            return "RevisionNotFound"
        files = self.repos[repo][revision]
        if filename not in files:
            return "EntryNotFound"
        served = self.corrupt.get((repo, revision, filename), files[filename])
        return revision, files[filename], served

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
