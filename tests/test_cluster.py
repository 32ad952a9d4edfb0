"""Operations: cluster.yaml against Ray's own schema, and real `ray job submit` to a loopback head."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
import yaml

import ray
from spamray.scores_table import ScoresTable

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def test_cluster_yaml_passes_the_launcher_schema():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))  # what `ray up` runs: defaults filled in, then checked
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p")) and gpu["max_workers"] >= 1


def test_a_broken_cluster_yaml_fails_the_schema():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["min_workers"] = "many"
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def loopback_head(monkeypatch):
    """A real Ray head on 127.0.0.1 (`ray start --head`), stopped by its processes' ids."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a loopback test cluster: no token
    temp_dir = tempfile.mkdtemp(prefix="srh-", dir="/tmp")  # short: Ray's socket paths must fit
    port, dashboard, client = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats",
                    # Its own job agent port: every head on a machine defaults to 52365, and the
                    # suite's in-process Ray may hold it (jobs then get "No available agent").
                    f"--dashboard-agent-listen-port={free_port()}",
                    # Its own client-server port: the default 10001 is shared by every head on a machine,
                    # and that process names no temp dir; the port names it for the teardown.
                    f"--ray-client-server-port={client}"], env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        yield address, env
    finally:
        stop_processes(f"{temp_dir}|--port={client}")


def stop_processes(pattern: str) -> None:
    """SIGTERM, then SIGKILL, to the processes whose command line matches and all their
    descendants (a raylet's agents rename themselves `ray::…`, so only their parent matches)."""
    import psutil

    def matching():
        pids = [int(p) for p in subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()]
        found = []
        for pid in pids:
            try:
                process = psutil.Process(pid)
                found += [process, *process.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return found

    processes = matching()
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=5)  # a test cluster: then SIGKILL what is left
    for process in alive + matching():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def submit(address, env, submission_id, *entrypoint):
    for _ in range(10):
        done = subprocess.run([RAY, "job", "submit", "--address", address, "--submission-id", submission_id,
                               "--working-dir", str(REPO), "--", sys.executable, *entrypoint],
                              env=env, capture_output=True, text=True, timeout=600)
        # Right after `ray start` the head may not have its job agent yet; Ray says to try again.
        if "No available agent to submit job" not in done.stderr:
            return done
        time.sleep(3)
    return done


def job_status(address, env, submission_id) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(address).get_job_status(submission_id).value)


def test_train_and_score_jobs_on_a_real_head(loopback_head, prepared_sms, sms_messages, tmp_path):
    address, env = loopback_head
    model, archive, scores = tmp_path / "model", tmp_path / "archive", tmp_path / "scores"
    trained = submit(address, env, "train-1", "jobs/train.py", "--data", prepared_sms, "--output", str(model),
                     "--weights", "random", "--preset", "gpt2-tiny", "--trainable", "all", "--epochs", "1",
                     "--learning-rate", "5e-4", "--storage-path", str(tmp_path / "runs"))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert job_status(address, env, "train-1") == "SUCCEEDED"
    assert (model / "spamray.json").exists()

    archive.mkdir()
    pd.DataFrame({"text": sms_messages[:500]}).to_parquet(archive / "a.parquet")
    scored = submit(address, env, "score-1", "jobs/score.py", "--model", str(model), "--input", str(archive),
                    "--output", str(scores), "--cpus-per-replica", "1")
    assert scored.returncode == 0, scored.stdout[-3000:] + scored.stderr[-3000:]
    assert job_status(address, env, "score-1") == "SUCCEEDED"
    frame = ScoresTable(str(scores)).read().to_pandas()
    assert len(frame) == 500 and sorted(frame["source_row"]) == list(range(500))

    failed = submit(address, env, "score-bad", "jobs/score.py", "--model", str(model), "--input",
                    str(tmp_path / "no-such-archive"), "--output", str(tmp_path / "scores-2"))
    assert failed.returncode != 0
    assert job_status(address, env, "score-bad") == "FAILED"
    logs = subprocess.run([RAY, "job", "logs", "--address", address, "score-bad"], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    assert "no-such-archive does not exist" in logs
