"""Shared fixtures: real SMS messages and GPT-2 checkpoints generated in the published format."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import uuid
from importlib import resources
from pathlib import Path

import faulty_local
import pytest
import store_clients
import torch
from faulty_s3 import FaultyS3
from loopback_s3 import start_s3_endpoint

TESTS = Path(__file__).parent

# Fixtures that start Ray, Serve or a server process: a test that uses one is in the slow tier.
SLOW_FIXTURES = {"ray_local", "s3_endpoint", "s3_place", "place", "loopback_head", "two_worker_cluster", "shared_cluster",
                 "served"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.slow)


class StartsRayOrAProcess(AssertionError):
    pass


@pytest.fixture(autouse=True)
def fast_tests_start_no_ray_and_no_process(request, monkeypatch):
    """The fast tier (`pytest -m "not slow"`) stays fast because none of its tests starts Ray or
    another process: one that does fails here, naming the marker it needs."""
    if request.node.get_closest_marker("slow"):
        return
    import ray

    def refuse(*args, **kwargs):
        raise StartsRayOrAProcess(f"{request.node.nodeid} starts Ray or a process: mark it @pytest.mark.slow "
                                  "(or use a fixture of the slow tier)")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.fixture(scope="session")
def sms_messages() -> list[str]:
    text = (resources.files("spamray") / "data" / "SMSSpamCollection").read_text(encoding="utf-8")
    return [row[1] for row in csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)]


def write_hf_checkpoint(folder: Path, n_embd: int, n_layer: int, n_head: int, seed: int = 0):
    """A random-weight GPT-2 written by transformers itself (config.json + model.safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def small_hf_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-small")
    model = write_hf_checkpoint(folder, n_embd=64, n_layer=2, n_head=4)
    return folder, model


@pytest.fixture(scope="session")
def gpt2_small_hf_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-gpt2-small")
    model = write_hf_checkpoint(folder, n_embd=768, n_layer=12, n_head=12, seed=1)
    return folder, model


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on loopback: moto's server, which enforces conditional writes as
    delta-rs needs, behind the proxy that fails requests on purpose when a test asks it to
    (faulty_s3.py; it passes everything through otherwise). Its settings go into this process's
    environment, so Ray workers started after it see them too."""
    server, settings = start_s3_endpoint()
    proxy = FaultyS3(settings["AWS_ENDPOINT_URL"])
    settings = {**settings, "AWS_ENDPOINT_URL": proxy.endpoint, **store_clients.ENVIRONMENT}
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield proxy
    proxy.stop()
    server.terminate()
    server.wait(timeout=30)
    for name, value in saved.items():
        os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


@pytest.fixture(scope="session")
def model_url(tmp_path_factory) -> str:
    """A saved spam classifier on the smallest preset (random weights): scoring tests' model."""
    import spamray
    from spamray import TextClassifier

    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("model") / "clf"
    TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), ["not spam", "spam"], max_length=96).save(str(folder))
    return str(folder)


class Place:
    """A folder on local disk or a bucket on the loopback S3 endpoint: tests that must hold on
    both take one of each."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)

    def join(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def upload(self, local: Path, name: str) -> str:
        """Copies a local file or folder here; returns its URL."""
        target = f"{self.path}/{name}"
        if Path(local).is_dir():
            for file in sorted(p for p in Path(local).rglob("*") if p.is_file()):
                self.fs.put_file(str(file), f"{target}/{file.relative_to(local).as_posix()}")
        else:
            self.fs.put_file(str(local), target)
        return self.join(name)

    def files(self, name: str, pattern: str = "*") -> list[str]:
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.glob(f"{self.path}/{name}/{pattern}"))


@pytest.fixture
def s3_place(s3_endpoint) -> Place:
    """A new bucket on the loopback S3 endpoint."""
    import boto3

    bucket = f"spamray-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return Place(f"s3://{bucket}")


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path) -> Place:
    if request.param == "s3":
        return request.getfixturevalue("s3_place")
    (tmp_path / "place").mkdir()
    return Place(str(tmp_path / "place"))


@pytest.fixture(scope="session")
def ray_local(s3_endpoint, tmp_path_factory):
    """One local Ray for the whole session (starting Ray costs seconds), shut down at the end.
    Started after the S3 endpoint, so that its workers reach it. Local disk goes through the layer
    that fails requests on purpose when a test sets a schedule (faulty_local.py), in this process
    and in every worker (store_clients.py, Ray's worker setup hook); without a schedule it passes
    everything through."""
    import ray

    os.environ[faulty_local.CONTROL] = str(tmp_path_factory.mktemp("local-faults"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    store_clients.setup()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"worker_process_setup_hook": "store_clients.setup"})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared_sms(tmp_path_factory) -> str:
    from spamray.config import PrepareConfig
    from spamray.prepare import prepare

    folder = tmp_path_factory.mktemp("prepared") / "sms"
    prepare(PrepareConfig(output=str(folder)))
    return str(folder)


def commit_record(table_url: str, version: int) -> dict:
    """What spamray recorded in the commit of a scores table's version (commitInfo["spamray"])."""
    import json

    entry = Path(table_url) / "_delta_log" / f"{version:020d}.json"
    info = next(json.loads(line) for line in entry.read_text().splitlines() if '"commitInfo"' in line)
    record = info["commitInfo"]["spamray"]
    return json.loads(record) if isinstance(record, str) else record


SPAMRAY = "import sys\nfrom spamray.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def spamray_process(code: str, args: list[str], stdout=subprocess.PIPE, **extra_env) -> subprocess.Popen:
    """`spamray ARGS` in a process (and session) of its own: `code` is SPAMRAY, or SPAMRAY after
    test-only changes made in that process (never options). It starts a local Ray of its own."""
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", **extra_env}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, start_new_session=True,
                            stdout=stdout, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")
def trained_enough(tmp_path_factory, prepared_sms):
    """A tiny classifier fitted in-process on the training split for a few hundred steps: far
    from the book's, but its scores separate spam from ham, and over-confidently."""
    import numpy as np
    import pandas as pd

    import spamray
    from spamray import TextClassifier

    torch.manual_seed(0)
    classifier = TextClassifier.from_gpt2(spamray.load_gpt2("random", "gpt2-tiny"), ["not spam", "spam"],
                                          trainable="all", max_length=64)
    frame = pd.read_parquet(f"{prepared_sms}/train.parquet")
    ids = classifier.encode(frame["text"].tolist())
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(300):
        rows = rng.choice(len(ids), 16, replace=False)
        tokens, lengths = spamray.get_tokenizer().pad([ids[i] for i in rows])
        loss = torch.nn.functional.cross_entropy(classifier(torch.from_numpy(tokens), torch.from_numpy(lengths)),
                                                 torch.as_tensor(frame["label"].to_numpy()[rows]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("calibrated") / "model"
    classifier.eval().save(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def exported_classifier(trained_enough, prepared_sms, tmp_path_factory) -> str:
    """`trained_enough` calibrated, with its ONNX graphs (`spamray export`): the ONNX paths' model."""
    from spamray.cli import main

    model = str(tmp_path_factory.mktemp("onnx") / "model")
    assert main(["calibrate", trained_enough, prepared_sms, "--output", model]) == 0
    assert main(["export", model, prepared_sms]) == 0
    return model
