"""`spamray serve` under load on loopback, beside the in-process scorer on the same messages and cores.

    python bench/serve.py [--cache runs/bench] [--clients 1 8 16 32 128] [--sizes 1 16]
                          [--messages 2048] [--max-batch-size 256] [--batch-wait-ms 25]
                          [--precision auto] [--cpus-per-replica N] [--model DIR]

The model is --model, or the demo's trained classifier (bench/score.py makes it once into --cache). First the
in-process scorer: `spamray.serve_requests.classify`, the very function a replica calls, over all the
messages at once on the replica's threads (its messages/s is the ceiling Serve is held to). Then
one replica on a local Ray behind Serve's HTTP proxy on 127.0.0.1, and for each number of
concurrent clients and messages per request a fixed number of requests (so every level stops by
itself), sent by asyncio clients over keep-alive connections: requests/s, messages/s and its
ratio to in-process, and the p50/p95/p99 latency. The in-process rate is measured again after the
load levels, and the ratios are to the mean of both (a shared machine's speed drifts). The
clients run in this process, on the same cores as the proxy and the replica: that is what a
loopback test can show, and it costs Serve some of the CPU the in-process scorer has to itself.
Goals (2 cores): at 32 clients x 1 message >= 25% of in-process messages/s; with 16-message
requests >= 75%; at 16 clients x 1 message p99 <= 4x p50. Serve's ingress is Ray's default unless
the environment picks another (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, RAY_SERVE_ENABLE_HA_PROXY=1): the
first line printed names it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import first_messages  # noqa: E402
from score import cpu_description, demo_classifier  # noqa: E402


@dataclass
class Level:
    clients: int
    size: int  # messages per request
    requests: int
    seconds: float
    latencies: list[float]
    failures: int

    @property
    def messages_per_second(self) -> float:
        return self.requests * self.size / self.seconds

    def percentile(self, q: float) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1] * 1000


def in_process_rate(model: str, texts: list[str], threads: int, precision: str, rounds: int = 3) -> float:
    """Messages/s of the replica's own scoring function over all the messages at once."""
    from spamray.replica import Scorer
    from spamray.serve_requests import classify

    scorer = Scorer(model, threads, model, precision)
    statuses = [None] * len(texts)
    classify(scorer, texts[:64], statuses[:64])  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        classify(scorer, texts, statuses)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


async def load(url: str, texts: list[str], clients: int, size: int, requests: int) -> Level:
    """`requests` POSTs of `size` messages each from `clients` concurrent clients."""
    import aiohttp

    bodies = [json.dumps({"texts": [texts[(i * size + j) % len(texts)] for j in range(size)]}).encode()
              for i in range(requests)]
    latencies, failures, next_request = [], 0, 0
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     headers={"Content-Type": "application/json"}) as session:
        async def client():
            nonlocal failures, next_request
            while next_request < requests:
                body, next_request = bodies[next_request], next_request + 1
                sent = time.perf_counter()
                async with session.post(url, data=body) as response:
                    await response.read()
                    failures += response.status != 200
                latencies.append(time.perf_counter() - sent)

        async def warm_up():
            async with session.post(url, data=bodies[0]) as response:
                await response.read()

        await asyncio.gather(*(warm_up() for _ in range(clients)))  # connections open, replica warm
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.perf_counter() - start
    return Level(clients, size, requests, seconds, latencies, failures)


def echo_deployment():
    """Serve's own ceiling: a deployment that reads and parses the request and answers at once,
    no model, behind the same proxy."""
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(name="Echo", max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
    class Echo:
        async def __call__(self, request):
            texts = json.loads(await request.body())["texts"]
            return JSONResponse({"results": [{"label": None, "n_tokens": len(text)} for text in texts]})

    return Echo.bind()


def ingress() -> str:
    """Which of Ray Serve's ingresses the environment selects."""
    chosen = [name for name in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY",
                                "RAY_SERVE_ENABLE_DIRECT_INGRESS") if os.environ.get(name) == "1"]
    return ", ".join(f"{name}=1" for name in chosen) or "Serve's HTTP proxy (the default)"


def serve_replica(model: str, args) -> str:
    """One replica behind Serve's proxy on a free loopback port; returns /classify's URL."""
    import socket

    import ray
    from ray import serve

    from spamray.config import ServeConfig
    from spamray.serve import run_application

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    cfg = ServeConfig(model=model, port=port, cpus_per_replica=args.cpus_per_replica, precision=args.precision,
                      max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                      max_texts=min(256, args.max_batch_size))
    run_application(cfg, token_sha256=None)
    serve.run(echo_deployment(), name="echo", route_prefix="/echo")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default="runs/bench")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 16, 32, 128])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--messages", type=int, default=2048, help="messages sent per level (at least 4 requests "
                        "per client)")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--batch-wait-ms", type=float, default=25.0)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--model", help="a saved classifier folder (default: the demo's, made into --cache)")
    parser.add_argument("--cpus-per-replica", type=int, default=os.cpu_count())
    args = parser.parse_args()
    model = args.model or demo_classifier(Path(args.cache).resolve())[0]
    texts = first_messages(args.messages)
    before = in_process_rate(model, texts, args.cpus_per_replica, args.precision)
    from spamray.replica import Scorer

    precision_used = Scorer(model, args.cpus_per_replica, model, args.precision).precision.precision
    base = serve_replica(model, args)
    levels, echoes = [], []
    for size in args.sizes:
        for clients in args.clients:
            requests = max(args.messages // size, 4 * clients)
            levels.append(asyncio.run(load(f"{base}/classify", texts, clients, size, requests)))
            print(f"  {clients} clients x {size}: {levels[-1].messages_per_second:,.0f} msgs/s", file=sys.stderr)
    for clients in (1, 32):
        echoes.append(asyncio.run(load(f"{base}/echo", texts, clients, 1, max(args.messages // 2, 4 * clients))))
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    after = in_process_rate(model, texts, args.cpus_per_replica, args.precision)
    in_process = (before + after) / 2
    print(f"{cpu_description()}; ingress: {ingress()}; one replica, {args.cpus_per_replica} threads, "
          f"--precision {args.precision} ({precision_used}), "
          f"--max-batch-size {args.max_batch_size}, --batch-wait-ms {args.batch_wait_ms:g}")
    print(f"in-process scorer (spamray.serve_requests.classify, {len(texts):,} messages at once): {before:,.0f} and "
          f"{after:,.0f} msgs/s, mean {in_process:,.0f}\n")
    print("| clients | msgs/request | requests | req/s | msgs/s | x in-process | p50 ms | p95 ms | p99 ms | non-200 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for level in levels:
        print(f"| {level.clients} | {level.size} | {level.requests:,} | {level.requests / level.seconds:,.0f} | "
              f"{level.messages_per_second:,.0f} | {level.messages_per_second / in_process:.2f} | "
              f"{level.percentile(50):.1f} | {level.percentile(95):.1f} | {level.percentile(99):.1f} | {level.failures} |")
    for echo in echoes:
        print(f"\nServe's own ceiling (the echo deployment, no model), {echo.clients} client(s) x 1 message: "
              f"{echo.requests / echo.seconds:,.0f} req/s, p50 {echo.percentile(50):.1f} ms", end="")
    print()
    by_shape = {(level.clients, level.size): level for level in levels}
    for (clients, size), bar in (((32, 1), 0.25), ((16, 16), 0.75), ((32, 16), 0.75)):
        if (clients, size) in by_shape:
            ratio = by_shape[clients, size].messages_per_second / in_process
            print(f"\ngoal, {clients} clients x {size} message(s) >= {bar:.0%} of in-process: {ratio:.0%} "
                  f"({'met' if ratio >= bar else 'missed'})", end="")
    print()
    if (16, 1) in by_shape:
        spread = by_shape[16, 1].percentile(99) / by_shape[16, 1].percentile(50)
        print(f"goal, 16 clients x 1 message p99 <= 4x p50: {spread:.1f}x ({'met' if spread <= 4 else 'missed'})")


if __name__ == "__main__":
    main()
