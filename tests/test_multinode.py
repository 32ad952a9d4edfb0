"""spamray on a Ray cluster of several nodes on this machine (`ray.cluster_utils.Cluster`: a
head and worker raylets), storage on the loopback S3 endpoint, the driver joining through
RAY_ADDRESS as under `ray job submit`. These tests lose no node, so they share one cluster;
test_lost_nodes.py starts one per test."""

import contextlib
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_cluster import RAY, free_port, job_status, submit

from spamray.scores_table import ScoresTable


@contextlib.contextmanager
def cluster_of_two_workers():
    """A head that runs no work (`num_cpus=0`, as Ray advises for larger clusters) and two
    1-CPU worker nodes; started after the S3 endpoint, so that its workers reach it."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")  # a loopback test cluster: no token
        dashboard = free_port()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                                "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
                                                                # not the default 52365 another Ray here may hold
                                                                "dashboard_agent_listen_port": free_port()})
        workers = [cluster.add_node(num_cpus=1, resources={name: 1}) for name in ("node_a", "node_b")]
        cluster.wait_for_nodes()
        try:
            yield cluster, workers, f"http://127.0.0.1:{dashboard}"
        finally:
            cluster.shutdown()


@pytest.fixture(scope="module")
def shared_cluster(s3_endpoint):
    """One cluster for the tests that lose no node: each scores or fails into places of its own."""
    with cluster_of_two_workers() as cluster:
        yield cluster


def driver_env(cluster) -> dict:
    """A spamray process that joins the cluster, as under `ray job submit`."""
    return {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


def test_scoring_on_two_one_cpu_worker_nodes_with_s3_in_and_out(shared_cluster, model_url, sms_messages, s3_place):
    # Replicas took half of each node's CPU and every read task wanted a whole one: no task could
    # start anywhere and the run hung. Read, tokenize and write tasks now ask for a quarter.
    cluster, workers, _ = shared_cluster
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


def test_a_storage_path_on_each_nodes_own_disk_is_refused_before_training(shared_cluster, prepared_sms, tmp_path):
    cluster, _, _ = shared_cluster
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


def test_score_jobs_submitted_to_the_cluster_end_as_what_happened(shared_cluster, model_url, sms_messages, s3_place):
    _, _, jobs = shared_cluster
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
