"""spamray on a Ray cluster of several nodes on this machine that loses nodes mid-run (each test
starts a cluster of its own: `ray.cluster_utils.Cluster`, `remove_node`), storage on the loopback
S3 endpoint, the driver joining through RAY_ADDRESS as under `ray job submit`."""

import json
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SPAMRAY
from test_multinode import cluster_of_two_workers, driver_env

from spamray import TextClassifier
from spamray.scores_table import ScoresTable


@pytest.fixture
def two_worker_cluster(s3_endpoint):
    """A cluster of its own, for a test that removes nodes."""
    with cluster_of_two_workers() as cluster:
        yield cluster


# `spamray score` whose writer tasks write every 64 rows: files appear early, so a node can be
# lost after some batches are done (a test-only change, made in that process).
SCORE_WITH_SMALL_WRITES = """
import sys
import spamray.score
spamray.score.WRITE_BATCH_ROWS = 64
""" + SPAMRAY


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

