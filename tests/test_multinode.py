"""spamray on a Ray cluster of several nodes on this machine (`ray.cluster_utils.Cluster`: a
head and worker raylets), storage on the loopback S3 endpoint, the driver joining through
RAY_ADDRESS as under `ray job submit`."""

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SPAMRAY
from test_cluster import RAY, free_port, job_status, submit

from spamray import TextClassifier
from spamray.scores_table import ScoresTable


@pytest.fixture
def two_worker_cluster(monkeypatch, s3_endpoint):
    """A head that runs no work (`num_cpus=0`, as Ray advises for larger clusters) and two
    1-CPU worker nodes; started after the S3 endpoint, so that its workers reach it."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a loopback test cluster: no token
    dashboard = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
                                                            # not the default 52365 another Ray here may hold
                                                            "dashboard_agent_listen_port": free_port()})
    workers = [cluster.add_node(num_cpus=1, resources={name: 1}) for name in ("node_a", "node_b")]
    cluster.wait_for_nodes()
    yield cluster, workers, f"http://127.0.0.1:{dashboard}"
    cluster.shutdown()


# `spamray score` whose writer tasks write every 64 rows: files appear early, so a node can be
# lost after some batches are done (a test-only change, made in that process).
SCORE_WITH_SMALL_WRITES = """
import sys
import spamray.score
spamray.score.WRITE_BATCH_ROWS = 64
""" + SPAMRAY


def driver_env(cluster) -> dict:
    """A spamray process that joins the cluster, as under `ray job submit`."""
    return {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


def test_scoring_on_two_one_cpu_worker_nodes_with_s3_in_and_out(two_worker_cluster, model_url, sms_messages, s3_place):
    # Replicas took half of each node's CPU and every read task wanted a whole one: no task could
    # start anywhere and the run hung. Read, tokenize and write tasks now ask for a quarter.
    cluster, workers, _ = two_worker_cluster
    place = s3_place
    model = place.upload(model_url, "model")
    for part in range(4):
        with place.fs.open(f"{place.path}/archive/part-{part}.parquet", "wb") as handle:
            pq.write_table(pa.table({"text": sms_messages[part * 1000:(part + 1) * 1000]}), handle)
    out = place.join("scores")
    env = driver_env(cluster)
    run = subprocess.run([sys.executable, "-m", "spamray.cli", "score", "--model", model, "--input", place.join("archive"),
                          "--output", out, "--replicas", "2", "--cpus-per-replica", "1", "--batch-size", "64"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = next(line for line in run.stdout.splitlines() if line.startswith("scored 4 of 4 files"))
    worker_ids = {worker.node_id[:12] for worker in workers}
    assert any(node in summary for node in worker_ids)  # the summary names the nodes that scored
    frame = ScoresTable(out).read().to_pandas()
    assert len(frame) == 4000 and not frame.duplicated(["source_file", "source_row"]).any()
    assert frame.groupby("source_file")["source_row"].agg(["min", "max", "count"]).values.tolist() == [[0, 999, 1000]] * 4


def test_a_storage_path_on_each_nodes_own_disk_is_refused_before_training(two_worker_cluster, prepared_sms, tmp_path):
    cluster, _, _ = two_worker_cluster
    env = driver_env(cluster)
    command = [sys.executable, "-m", "spamray.cli", "train", "--data", prepared_sms, "--output", str(tmp_path / "model"),
               "--weights", "random", "--preset", "gpt2-tiny", "--storage-path", str(tmp_path / "runs")]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "is on each node's own disk, and this cluster has 3 nodes" in run.stderr
    assert "--shared-storage" in run.stderr and not (tmp_path / "runs").exists()


def test_only_a_cluster_of_several_nodes_needs_shared_checkpoint_storage():
    from spamray.train import check_storage_path

    check_storage_path(None, nodes=1, shared=False)  # one machine: its own disk is everyone's
    check_storage_path("s3://bucket/runs", nodes=3, shared=False)
    check_storage_path("/mnt/nfs/runs", nodes=3, shared=True)
    with pytest.raises(ValueError, match="~/ray_results"):
        check_storage_path(None, nodes=2, shared=False)


def test_score_jobs_submitted_to_the_cluster_end_as_what_happened(two_worker_cluster, model_url, sms_messages, s3_place):
    _, _, jobs = two_worker_cluster
    model = s3_place.upload(model_url, "model")
    with s3_place.fs.open(f"{s3_place.path}/archive/a.parquet", "wb") as handle:
        pq.write_table(pa.table({"text": sms_messages[:300]}), handle)
    common = ["--model", model, "--replicas", "2", "--cpus-per-replica", "1"]
    scored = submit(jobs, dict(os.environ), "score-s3", "jobs/score.py", *common, "--input", s3_place.join("archive"),
                    "--output", s3_place.join("scores"))
    assert scored.returncode == 0, scored.stdout[-3000:] + scored.stderr[-3000:]
    assert job_status(jobs, None, "score-s3") == "SUCCEEDED"
    assert sorted(ScoresTable(s3_place.join("scores")).read()["source_row"].to_pylist()) == list(range(300))

    missing = submit(jobs, dict(os.environ), "score-missing", "jobs/score.py", *common,
                     "--input", s3_place.join("no-such-archive"), "--output", s3_place.join("scores-2"))
    assert missing.returncode != 0 and job_status(jobs, None, "score-missing") == "FAILED"
    logs = subprocess.run([RAY, "job", "logs", "--address", jobs, "score-missing"], capture_output=True, text=True,
                          timeout=60).stdout
    assert "no-such-archive does not exist" in logs


def test_a_worker_node_lost_mid_scoring_leaves_every_row_once(two_worker_cluster, model_url, sms_messages, s3_place):
    # As a spot instance or an autoscaler takes a node away: the run finishes on the nodes left
    # (a new node joins, as the autoscaler would bring one) or fails; either way, after the run
    # and any re-run, every row is in the table once.
    cluster, workers, _ = two_worker_cluster
    model = s3_place.upload(model_url, "model")
    for part in range(4):
        with s3_place.fs.open(f"{s3_place.path}/archive/part-{part}.parquet", "wb") as handle:
            pq.write_table(pa.table({"text": sms_messages[part * 1300:(part + 1) * 1300]}), handle)
    out = s3_place.join("scores")
    command = [sys.executable, "-c", SCORE_WITH_SMALL_WRITES, "score", "--model", model, "--input", s3_place.join("archive"),
               "--output", out, "--incremental", "--replicas", "2", "--cpus-per-replica", "1", "--batch-size", "8"]
    run = subprocess.Popen(command, env=driver_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    table = ScoresTable(out)
    deadline = time.time() + 120
    while time.time() < deadline and run.poll() is None and not table.fs.glob(f"{table.path}/input_key=*/scoring=*/part-*.parquet"):
        time.sleep(0.2)
    assert run.poll() is None, "the run ended before any batch was written"
    cluster.remove_node(workers[1])
    cluster.add_node(num_cpus=1)
    stdout, stderr = run.communicate(timeout=300)
    print(f"run after losing a node: exit {run.returncode}")
    if run.returncode != 0:
        assert "Error" in stderr  # a failure that says what happened, then a re-run
        rerun = subprocess.run(command, env=driver_env(cluster), capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    frame = table.read().to_pandas()
    assert len(frame) == 5200 and not frame.duplicated(["source_file", "source_row"]).any()


def latest_checkpoint_epoch(place, run_name: str) -> int:
    """The epoch of the latest checkpoint Ray Train has registered (0 before the first)."""
    snapshot = f"{place.path}/runs/{run_name}/checkpoint_manager_snapshot.json"
    if not place.fs.exists(snapshot):
        return 0
    latest = json.loads(place.fs.cat_file(snapshot)).get("latest_checkpoint_result") or {}
    return latest.get("metrics", {}).get("epoch", 0)


def test_training_across_nodes_resumes_from_its_checkpoint_after_losing_a_node(two_worker_cluster, prepared_sms,
                                                                               s3_place):
    # A worker per node, data, checkpoints and the classifier on S3, the head running no work:
    # the workers hold every CPU of the cluster. Both worker nodes are lost after the first
    # epoch's checkpoint, with every block a task made on them, and two nodes are added in
    # their place (as an autoscaler would): the new workers take every CPU again, and training
    # goes on from that checkpoint. A split made by read tasks would have to be read again, and
    # no CPU is left for a read: the workers waited until --data-timeout-s, which spends the one
    # failure allowed, and the run failed. The splits are the driver's blocks, on the head: the
    # run resumes at once.
    cluster, workers, _ = two_worker_cluster
    place = s3_place
    data = place.upload(prepared_sms, "data")
    epochs, steps_per_epoch = 2, 1045 // 2 // 8  # each worker: half the training split, in batches of 8
    command = [sys.executable, "-m", "spamray.cli", "train", "--data", data, "--output", place.join("model"),
               "--weights", "random", "--preset", "gpt2-tiny", "--trainable", "all", "--learning-rate", "5e-4",
               "--epochs", str(epochs), "--num-workers", "2", "--cpus-per-worker", "1", "--max-failures", "1",
               "--data-timeout-s", "120", "--storage-path", place.join("runs"), "--run-name", "lost-node"]
    run = subprocess.Popen(command, env=driver_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None and latest_checkpoint_epoch(place, "lost-node") < 1:
        time.sleep(0.2)
    checkpointed = latest_checkpoint_epoch(place, "lost-node")
    assert run.poll() is None and checkpointed == 1, "training ended, or made no checkpoint, before a node was lost"
    for worker in workers:
        cluster.remove_node(worker)
    lost_at = time.time()
    for _ in workers:
        cluster.add_node(num_cpus=1)
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    recovered_in = time.time() - lost_at
    print(f"finished {recovered_in:.0f} s after the nodes were lost")
    assert recovered_in < 120, "the run waited for its data timeout: a lost block was rebuilt late, or never"
    training = TextClassifier.load(place.join("model")).metrics["training"]
    assert training["resumed_from_epoch"] == checkpointed  # from the checkpoint, not from step 0
    assert training["global_step"] == epochs * steps_per_epoch - 1  # no step counted twice
    assert training["examples_seen"] == epochs * steps_per_epoch * 8 * 2
    digests = training["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]

