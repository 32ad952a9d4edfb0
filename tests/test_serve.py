"""Online classification: `spamray serve` over real HTTP on loopback (a local Ray of its own), and
its Serve config file deployed with `serve deploy` to a loopback head: the model rolled out under
traffic, a replica killed under traffic."""

import hashlib
import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import SPAMRAY, spamray_process
from test_cluster import RAY, free_port, loopback_head  # noqa: F401 (a fixture)

from spamray import TextClassifier
from spamray.calibrate import at_precision
from spamray.cli import main
from spamray.config import ScoreConfig
from spamray.score import score
from spamray.scores_table import ScoresTable
from spamray.serve_requests import BadRequest, authorized, parse_classify

REPO = Path(__file__).resolve().parent.parent
SERVE_CLI = str(Path(RAY).parent / "serve")
TOKEN = "a-test-token-3f9c"


def call(url: str, body: bytes | None = None, token: str | None = TOKEN, timeout: float = 60.0) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one HTTP request: POST with a body, else GET."""
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = {"error": text.decode(errors="replace")}
        return error.code, payload, dict(error.headers)


def classify(base: str, texts, ids=None, token=TOKEN, timeout=60.0):
    document = {"texts": texts} if ids is None else {"texts": texts, "ids": ids}
    return call(f"{base}/classify", json.dumps(document).encode(), token, timeout)


def wait_until_healthy(base: str, process: subprocess.Popen | None = None, timeout: float = 180.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"spamray serve exited with {process.returncode}: {process.stderr.read()[-3000:]}")
        try:
            status, body, _ = call(f"{base}/healthz", token=None, timeout=5)
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{base}/healthz did not answer 200 within {timeout:.0f} s")


# -- requests, without Ray --------------------------------------------------------------------
@pytest.mark.parametrize("body, status, message", [
    (b"not json", 400, "the body is not JSON"),
    (b"\xff\xfe{", 400, "the body is not JSON"),
    (b"[" * 100_000, 400, "the body is not JSON (RecursionError"),
    (b'["hello"]', 400, "the body has no `texts` (it is a list)"),
    (b'{"text": ["hello"]}', 400, "the body has no `texts`"),
    (b'{"texts": "hello"}', 400, "`texts` is a string, not a list of strings"),
    (b'{"texts": ["ok", 5]}', 400, "texts[1] is a number, not a string"),
    (b'{"texts": ["ok", null]}', 400, "texts[1] is null, not a string"),
    (b'{"texts": ["a", "b"], "ids": [1]}', 400, "`ids` is a list of 1: give one id per text (2)"),
    (b'{"texts": ["a"], "ids": [true]}', 400, "ids[0] is a boolean"),
    (b'{"texts": ["a", "b"], "ids": ["x", "bad \\udc80 id"]}', 400, "ids[1] is a string with a lone surrogate"),
    (b'{"texts": ["a"], "lang": "en"}', 400, "unknown field(s) ['lang']"),
    (json.dumps({"texts": ["a"] * 9}).encode(), 400, "`texts` has 9 messages, more than one request may carry (8"),
])
def test_each_bad_request_is_named(body, status, message):
    with pytest.raises(BadRequest) as refused:
        parse_classify(body, max_texts=8)
    assert refused.value.status == status and message in str(refused.value)


def test_a_text_without_utf8_is_marked_undecodable_not_refused():
    parsed = parse_classify(b'{"texts": ["fine", "bad \\ud800 surrogate", ""], "ids": ["a", 7, "c"]}', max_texts=8)
    assert parsed.texts == ["fine", None, ""] and parsed.statuses == [None, "undecodable", None]
    assert parsed.ids == ["a", 7, "c"]


def test_the_token_is_checked_by_its_digest():
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    assert authorized(f"Bearer {TOKEN}", digest) and authorized(f"bearer  {TOKEN}", digest)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "):
        assert not authorized(header, digest), header
    assert authorized(None, None)  # no token set: every caller


@pytest.mark.parametrize("options, message", [
    (["--autoscale", "4:1"], "--autoscale '4:1': give MIN:MAX"),
    (["--autoscale", "1:3", "--replicas", "2"], "--replicas and --autoscale both"),
    (["--max-texts", "512"], "--max-batch-size 256 is less than --max-texts 512"),
    (["--port", "70000"], "--port 70000 is not a TCP port"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms must be 0 or more"),
    (["--detach"], "--detach leaves the application on a cluster: set RAY_ADDRESS"),
    (["--token-file", "/dev/null"], "--token-file /dev/null is empty"),
    (["--ingress", "haproxy", "--config-out", "/tmp/spamray-never-written.yaml"],
     "a cluster's ingress is the cluster's own: start its nodes with RAY_SERVE_ENABLE_HA_PROXY=1"),
])
def test_settings_are_refused_before_anything_is_deployed(model_url, options, message, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", "--model", model_url, *options]) == 1
    assert message in capsys.readouterr().err


def test_an_explicit_bf16_needs_a_bf16_threshold(trained_enough, prepared_sms, tmp_path, capsys):
    model = str(tmp_path / "model")
    assert main(["calibrate", trained_enough, prepared_sms, "--output", model]) == 0
    classifier = TextClassifier.load(model)
    classifier.operating_point.thresholds = {"fp32": classifier.operating_point.threshold}  # `--precisions fp32`
    classifier.save(model, overwrite=True)
    assert main(["serve", "--model", model, "--precision", "bf16", "--config-out", str(tmp_path / "c.yaml")]) == 1
    assert "no threshold was chosen at bf16" in capsys.readouterr().err and not (tmp_path / "c.yaml").exists()


def config_file(tmp_path: Path, model: str, *options: str) -> Path:
    path = tmp_path / f"serve-{hashlib.sha1((model + str(options)).encode()).hexdigest()[:8]}.yaml"
    assert main(["serve", "--model", model, "--config-out", str(path), *options]) == 0
    return path


def test_the_config_file_is_a_serve_deploy_config_holding_no_secret(model_url, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    path = config_file(tmp_path, model_url, "--autoscale", "1:4", "--token-file", str(token_file), "--port", "9001")
    document = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(document)  # what `serve deploy` checks
    (app,) = document["applications"]
    (deployment,) = app["deployments"]
    assert app["import_path"] == "spamray.serve:app_builder" and document["http_options"]["host"] == "127.0.0.1"
    assert deployment["user_config"]["model"] == model_url and document["http_options"]["port"] == 9001
    assert deployment["autoscaling_config"]["min_replicas"] == 1 and deployment["autoscaling_config"]["max_replicas"] == 4
    assert app["args"]["token_sha256"] == hashlib.sha256(TOKEN.encode()).hexdigest() and TOKEN not in path.read_text()


def test_the_shipped_config_file_is_what_spamray_writes(model_url, tmp_path):
    shipped = REPO / "deploy" / "serve.yaml"
    command = next(line for line in shipped.read_text().splitlines() if line.startswith("#   spamray serve"))
    args = command.removeprefix("#   spamray ").split()
    example_model = args[args.index("--model") + 1]
    args[args.index("--model") + 1] = model_url  # (the example's bucket is not on this machine)
    written = tmp_path / "written.yaml"
    assert main([*args, "--config-out", str(written)]) == 0
    document = yaml.safe_load(written.read_text())
    document["applications"][0]["deployments"][0]["user_config"]["model"] = example_model
    assert yaml.safe_load(shipped.read_text()) == document


# -- `spamray serve` on a local Ray -----------------------------------------------------------
@pytest.fixture(scope="module")
def served(trained_enough, tmp_path_factory):
    """`spamray serve` in a process of its own, with a token, scoring at fp32 (the in-process
    reference computes in fp32); stopped by SIGTERM at the end, which must end it cleanly."""
    folder = tmp_path_factory.mktemp("serve")
    (folder / "token").write_text(TOKEN)
    port = free_port()
    process = spamray_process(SPAMRAY, ["serve", "--model", trained_enough, "--port", str(port), "--token-file",
                                        str(folder / "token"), "--cpus-per-replica", "1", "--precision", "fp32",
                                        "--max-texts", "64", "--max-batch-size", "64", "--max-body-bytes", "65536",
                                        "--batch-wait-ms", "5"])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, process)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()


def test_classify_equals_predict_and_the_scores_table(served, trained_enough, sms_messages, ray_local, tmp_path):
    base, _ = served
    long_text = " ".join(sms_messages[:60])  # over the classifier's 64 tokens
    texts = sms_messages[:40] + [long_text, "", "   ", "🎉 Congrats!! 你赢了 ¥1000 📱"]
    ids = [f"m{i}" for i in range(len(texts))]
    status, body, _ = classify(base, texts, ids)
    assert status == 200, body
    results = body["results"]
    assert [r["id"] for r in results] == ids and body["precision"] == "fp32"
    assert body["model"] == trained_enough and body["model_version"] == TextClassifier.load(trained_enough).version
    assert [r["status"] for r in results[-4:]] == ["truncated", "empty", "empty", "ok"]
    assert results[-3]["label"] is None and results[-3]["probs"] is None and results[-3]["n_tokens"] == 0

    classifier = TextClassifier.load(trained_enough)
    scored = [i for i, r in enumerate(results) if r["status"] in ("ok", "truncated")]
    expected = classifier.predict([texts[i] for i in scored])
    for i, prediction in zip(scored, expected):
        assert results[i]["label"] == prediction.label
        assert np.allclose([results[i]["probs"][label] for label in classifier.labels],
                           [prediction.probs[label] for label in classifier.labels], atol=1e-5)

    archive = tmp_path / "archive"
    archive.mkdir()
    pq.write_table(pa.table({"id": ids, "text": texts}), archive / "part.parquet")
    out = str(tmp_path / "scores")
    score(ScoreConfig(model=trained_enough, input=str(archive), output=out, id_column="id", precision="fp32"))
    table = ScoresTable(out).read().to_pandas().set_index("id").loc[ids]
    assert table["status"].tolist() == [r["status"] for r in results]
    assert table["n_tokens"].tolist() == [r["n_tokens"] for r in results]
    assert [None if label is None or label != label else label for label in table["label"]] == \
        [r["label"] for r in results]  # (pandas reads a null label as NaN)
    for i in scored:
        assert abs(table["p_spam"].iloc[i] - results[i]["probs"]["spam"]) <= 1e-5


def test_bad_requests_get_4xx_and_the_replica_serves_on(served):
    base, _ = served
    for body, status, message in [
        (b"{not json", 400, "the body is not JSON"),
        (b'{"texts": [1]}', 400, "texts[0] is a number"),
        (b'{"texts": ["a"], "ids": ["\\ud800"]}', 400, "ids[0] is a string with a lone surrogate"),
        (json.dumps({"texts": ["x"] * 65}).encode(), 400, "more than one request may carry (64"),
        (json.dumps({"texts": ["x" * 70_000]}).encode(), 413, "more than 65,536 (--max-body-bytes)"),
    ]:
        answer = call(f"{base}/classify", body)
        assert answer[:1] == (status,) and message in answer[1]["error"], answer
    assert call(f"{base}/nothing-here")[0] == 404
    answer = call(f"{base}/classify")
    assert answer[0] == 405 and "takes POST, not GET" in answer[1]["error"]
    status, body, _ = classify(base, ["still here?"])
    assert status == 200 and body["results"][0]["status"] == "ok"


def test_every_route_but_healthz_needs_the_token(served, trained_enough):
    base, _ = served
    for token in (None, "wrong"):
        status, body, headers = classify(base, ["hello"], token=token)
        assert status == 401 and "Bearer" in body["error"] and headers.get("www-authenticate") == "Bearer"
        assert call(f"{base}/model", token=token)[0] == 401
    assert call(f"{base}/healthz", token=None)[0] == 200
    status, model, _ = call(f"{base}/model")
    classifier = TextClassifier.load(trained_enough)
    assert status == 200 and model["model_version"] == classifier.version and model["labels"] == classifier.labels
    assert model["precision"] == "fp32" and model["max_length"] == classifier.max_length
    assert model["max_batch_size"] == 64 and model["batch_wait_ms"] == pytest.approx(5)  # the user_config's, not the defaults


def test_concurrent_requests_each_get_their_own_answers(served, trained_enough, sms_messages):
    base, _ = served
    requests = [sms_messages[i:i + 1 + i % 5] for i in range(0, 96, 3)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda texts: classify(base, texts, ids=list(range(len(texts)))), requests))
    classifier = TextClassifier.load(trained_enough)
    for texts, (status, body, _) in zip(requests, answers):
        assert status == 200 and len(body["results"]) == len(texts)
        for result, prediction in zip(body["results"], classifier.predict(texts)):
            assert result["label"] == prediction.label
            assert abs(result["probs"]["spam"] - prediction.probs["spam"]) <= 1e-5


def test_sigterm_ends_the_server(served):
    _, process = served
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=90) == 0


# -- the Serve config file on a cluster: a model rolled out and a replica killed under traffic ----
class Traffic:
    """Clients that keep sending 1-3 message requests, each with a timeout, recording every answer
    (or the error in its place) with when it was sent and answered."""

    def __init__(self, base: str, texts: list[str], clients: int = 4, timeout: float = 30.0):
        self.base, self.texts, self.timeout = base, texts, timeout
        self.answers: list[tuple[float, float, int | str, str | None]] = []  # (sent, answered, status, version)
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(clients)]
        for thread in self.threads:
            thread.start()

    def client(self, n: int) -> None:
        i = n
        while not self.stopping.is_set():
            texts = self.texts[i % len(self.texts):][:1 + i % 3] or self.texts[:1]
            sent = time.time()
            try:
                status, body, _ = classify(self.base, texts, token=None, timeout=self.timeout)
                version = body.get("model_version") if status == 200 else None
            except Exception as error:  # a timeout or a dropped connection: recorded, asserted on
                status, version = f"{type(error).__name__}: {error}", None
            with self.lock:
                self.answers.append((sent, time.time(), status, version))
            i += 4

    def stop(self) -> list[tuple[float, float, int | str, str | None]]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=self.timeout + 10)
        return sorted(self.answers)


def serve_deploy(config: Path, dashboard: str, env: dict) -> None:
    done = subprocess.run([SERVE_CLI, "deploy", str(config), "--address", dashboard], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def wait_for_version(base: str, version: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if call(f"{base}/healthz", token=None, timeout=5)[1].get("model_version") == version:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"version {version} did not answer within {timeout:.0f} s")


def replica_processes():
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if any("ServeReplica:spamray:Classifier" in part
                                                                 for part in p.info["cmdline"] or [])]


def test_a_new_model_rolls_out_and_a_killed_replica_is_replaced_without_losing_requests(
        loopback_head, trained_enough, model_url, sms_messages, tmp_path):  # noqa: F811
    dashboard, env = loopback_head
    port = free_port()
    options = ["--port", str(port), "--cpus-per-replica", "1", "--precision", "fp32"]
    first, second = config_file(tmp_path, trained_enough, *options), config_file(tmp_path, model_url, *options)
    old, new = TextClassifier.load(trained_enough).version, TextClassifier.load(model_url).version
    base = f"http://127.0.0.1:{port}"
    elsewhere = {p.pid for p in replica_processes()}  # (none, unless another Serve runs on this machine)
    serve_deploy(first, dashboard, env)
    wait_for_version(base, old)

    replicas = {p.pid for p in replica_processes()} - elsewhere
    traffic = Traffic(base, sms_messages[:50])
    time.sleep(2)
    serve_deploy(second, dashboard, env)  # only user_config.model changed: the replica reloads in place
    wait_for_version(base, new)
    time.sleep(2)
    answers = traffic.stop()
    assert len(answers) > 20 and all(status == 200 for _, _, status, _ in answers), \
        [a for a in answers if a[2] != 200][:5]
    assert {version for *_, version in answers} == {old, new}
    switched = min(answered for _, answered, _, version in answers if version == new)
    assert all(version == new for sent, _, _, version in answers if sent > switched)
    assert len(replicas) == 1 and {p.pid for p in replica_processes()} - elsewhere == replicas, \
        "the rollout replaced the replica instead of reloading it in place"

    traffic = Traffic(base, sms_messages[:50])
    time.sleep(2)
    killed = time.time()
    for process in replica_processes():
        if process.pid in replicas:
            process.kill()
    wait_for_version(base, new, timeout=120)
    recovered = time.time()
    time.sleep(3)
    answers = traffic.stop()
    assert {p.pid for p in replica_processes()} - elsewhere - replicas, "Serve did not start a new replica"
    for sent, answered, status, _ in answers:  # each answered in time: 200, or a clear 5xx while it was down
        assert status == 200 or (isinstance(status, int) and status >= 500), status
        assert answered - sent < 30 + 5
    after = [status for sent, _, status, _ in answers if sent > recovered]
    assert after and all(status == 200 for status in after)
    assert any(sent > killed for sent, *_ in answers)


@pytest.mark.slow
def test_the_haproxy_ingress_serves_on_loopback_with_the_token(exported_classifier, sms_messages, tmp_path):
    """Ray Serve's HAProxy ingress in front of the replica (--ingress haproxy): the requests still
    need the token, the answers are the classifier's at the path `auto` chose (ONNX Runtime int8
    where the classifier carries its graph), and HAProxy binds the HTTP port on loopback alone."""
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    process = spamray_process(SPAMRAY, ["serve", "--model", exported_classifier, "--port", str(port), "--token-file",
                                        str(tmp_path / "token"), "--cpus-per-replica", "1", "--ingress", "haproxy"])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, process)
        listening = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert "haproxy" in listening and f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
        assert classify(base, ["hello"], token=None)[0] == 401
        status, body, _ = classify(base, sms_messages[:20])
        assert status == 200 and body["precision"] == "onnx-int8"
        expected = at_precision(TextClassifier.load(exported_classifier), "onnx-int8").predict(sms_messages[:20])
        assert [result["label"] for result in body["results"]] == [p.label for p in expected]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
