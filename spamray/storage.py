"""Paths and URLs through fsspec: one set of helpers for local disk, s3://, gs://, https://, file://.

The promise every writer here keeps: what appears at the destination appears whole. On local
disk that is a rename of a finished temporary; on object stores each object is written in
one request, and folders are committed by writing their marker file last.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    # No cached listings: files appear while a run works (written by other processes, other runs),
    # and a stale listing would hide them.
    fs, path = fsspec.core.url_to_fs(str(url), use_listings_cache=False)
    return fs, path


def is_local(url: str) -> bool:
    return isinstance(url_to_fs(url)[0], LocalFileSystem)


def local_path(url: str) -> Path:
    """The plain path of a local URL (`file:///x` or `/x`)."""
    fs, path = url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        raise ValueError(f"{url} is not on the local file system")
    return Path(path)


# Requests to an object store wait on the network, not the CPU: this many go at once.
PARALLEL_REQUESTS = 16


def map_requests(request: Callable, items: Iterable) -> list:
    """`request(item)` for every item, several at once (HEADs and LISTs on an object store take a
    round trip each), results in the items' order."""
    with ThreadPoolExecutor(PARALLEL_REQUESTS) as pool:
        return list(pool.map(request, items))


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes) -> None:
    """Writes one file so that a reader sees the old content or the new, never a part."""
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    else:
        fs.pipe_file(path, data)


def remove(url: str) -> None:
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def publish_folder(local_dir: Path, url: str, commit_file: str, overwrite: bool = False) -> None:
    """Copies a finished local folder to `url`, whole or not at all.

    Local destination: the folder is copied next to it and renamed into place. Remote: every
    file is uploaded, `commit_file` last, so a reader that checks for it never sees a part.
    """
    fs, path = url_to_fs(url)
    if fs.exists(path) and fs.ls(path) and not overwrite:
        raise FileExistsError(f"{url} already exists and is not empty; choose another place or pass overwrite")
    if isinstance(fs, LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.staging-{uuid.uuid4().hex}"
        shutil.copytree(local_dir, staging)
        retired = None
        if target.exists():
            retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
            os.rename(target, retired)
        os.rename(staging, target)
        if retired is not None:
            shutil.rmtree(retired)
        return
    if fs.exists(path):
        fs.rm(path, recursive=True)
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    for file in sorted(files, key=lambda p: p.name == commit_file):
        fs.put_file(str(file), join(path, file.relative_to(local_dir).as_posix()))
