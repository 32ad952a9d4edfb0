"""The test session's store clients, set up in the driver and in every Ray worker (Ray's worker
setup hook): local disk through the layer that fails requests on purpose (faulty_local.py), and
S3 clients that give up sooner than by default (2 attempts in botocore, from AWS_MAX_ATTEMPTS;
2 in s3fs's own retry loop, 5 by default), so that a fault that outlasts the retries fails a
request in about a second rather than in 40. delta-rs keeps its own (10 retries, about 2 s).

The hook runs in every worker Ray starts, so it imports nothing heavy: s3fs (about a second) is
named by its path, and fsspec imports it when a process first reaches s3://."""

import fsspec

import faulty_local

ENVIRONMENT = {"AWS_MAX_ATTEMPTS": "2"}  # read by botocore, in every process started after it is set


def setup() -> None:
    faulty_local.install()
    for protocol in ("s3", "s3a"):
        fsspec.register_implementation(protocol, "s3fs_fewer_retries.S3FewerRetries", clobber=True)
