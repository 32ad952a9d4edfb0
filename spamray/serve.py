"""Online classification with Ray Serve: the saved classifier behind HTTP, concurrent requests
scored together.

    POST /classify  {"texts": [...], "ids": [...]}  ->  {"model_version", "precision", "results": [...]}
    GET  /healthz   200 once the replica's model is loaded (no token: load balancers ask it)
    GET  /model     the model's URL, version, labels, threshold and precision

A message goes through batch scoring's own steps, `replica.tokenize_batch` then `replica.Scorer`, so
it gets the same status, label and probabilities here as in the scores table. A request is read
and checked first (serve_requests.py), a bad one answered with a 4xx that names what
is wrong; the replica's batch handler (`@serve.batch`, counted in messages) then scores the
messages of many requests in one model batch. The model URL and the batch settings live in the
deployment's user_config: `serve deploy` of a config file with a new URL loads the new model
beside the old one, which answers until the swap (`Classifier.reconfigure`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import saved
from .config import ServeConfig, autoscale_bounds
from .onnx_graphs import export_problems
from .precision import resolve_precision
from .ray_runtime import start_ray
from .replica import Scorer
from .serve_requests import BadRequest, authorized, classify, parse_classify, read_body

APP_NAME = "spamray"
DEPLOYMENT_NAME = "Classifier"
TOKEN_ENV = "SPAMRAY_SERVE_TOKEN"
ROUTES = {"/classify": "POST", "/healthz": "GET", "/model": "GET"}
# Serve answers a request that takes longer than this with a timeout instead of holding the
# client: a replica stuck on one batch never hangs its callers.
REQUEST_TIMEOUT_S = 60
logger = logging.getLogger("ray.serve")  # a replica's lines go to Serve's log files


# -- the Serve deployment -------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplicaSettings:
    """What a replica is built with (the application's `args` in a Serve config file): changing
    one restarts the replicas. The model and the batch settings are in `ModelSettings`."""

    cpus: int = ServeConfig.cpus_per_replica  # (the defaults are the CLI's)
    precision: str = ServeConfig.precision
    max_texts: int = ServeConfig.max_texts
    max_body_bytes: int = ServeConfig.max_body_bytes
    token_sha256: str | None = None


@dataclass(frozen=True)
class ModelSettings:
    """The deployment's user_config: `serve deploy` of new values reconfigures replicas in place."""

    model: str
    max_batch_size: int = ServeConfig.max_batch_size
    batch_wait_ms: float = ServeConfig.batch_wait_ms

    @classmethod
    def from_user_config(cls, user_config: dict | None, max_texts: int) -> "ModelSettings":
        names = [field.name for field in dataclasses.fields(cls)]
        if not isinstance(user_config, dict) or "model" not in user_config:
            raise ValueError(f"the deployment's user_config must name the model: {{model: URL}}, got {user_config!r}")
        unknown = sorted(set(user_config) - set(names))
        if unknown:
            raise ValueError(f"unknown user_config key(s) {unknown}; the keys are {names}")
        settings = cls(**user_config)
        if settings.max_batch_size < max_texts:
            raise ValueError(f"max_batch_size {settings.max_batch_size} is less than max_texts {max_texts}: a full "
                             "request would never fit in a batch")
        if settings.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be 0 or more, not {settings.batch_wait_ms}")
        return settings


def messages_in(requests: list[tuple[list, list]]) -> int:
    """A batch's size in messages (@serve.batch counts with this): requests carry 1 to max_texts."""
    return sum(len(texts) for texts, _ in requests)


@serve.deployment(name=DEPLOYMENT_NAME)
class Classifier:
    """A replica: one loaded model at a time, HTTP requests in, batched scoring."""

    def __init__(self, settings: ReplicaSettings):
        self.settings = settings
        self.scorer: Scorer | None = None

    async def reconfigure(self, user_config: dict) -> None:
        """Called with the user_config at start and whenever it changes: loads a new model while
        the old one answers, then swaps them between two batches."""
        model = ModelSettings.from_user_config(user_config, self.settings.max_texts)
        self.classify_batch.set_max_batch_size(model.max_batch_size)
        self.classify_batch.set_batch_wait_timeout_s(model.batch_wait_ms / 1000)
        self.batching = model  # what /model reports (Serve's batch handler has no public getters)
        if self.scorer is None or model.model != self.scorer.model_name:
            scorer = await asyncio.to_thread(Scorer, model.model, self.settings.cpus, model.model,
                                             self.settings.precision)
            self.scorer = scorer
            logger.info(f"spamray: loaded {model.model} (version {scorer.classifier.version}), "
                        f"{scorer.precision.precision} ({scorer.precision.reason})")

    def check_health(self) -> None:
        if self.scorer is None:
            raise RuntimeError("no model loaded: the deployment's user_config names none ({model: URL})")

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            return await self.route(request)
        except BadRequest as error:
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            return JSONResponse({"error": str(error)}, status_code=error.status, headers=headers)
        except Exception as error:  # a bug, or out of memory on a batch: its requests fail, the replica serves on
            logger.exception("spamray: a request failed")
            return JSONResponse({"error": f"internal error: {type(error).__name__}: {error}"}, status_code=500)

    async def route(self, request: Request) -> JSONResponse:
        path = request.url.path.removeprefix(request.scope.get("root_path", "")).rstrip("/") or "/"
        method = ROUTES.get(path)
        if method is None:
            raise BadRequest(404, f"no route {path}; the routes are POST /classify, GET /healthz, GET /model")
        if request.method != method:
            raise BadRequest(405, f"{path} takes {method}, not {request.method}")
        scorer = self.scorer
        if scorer is None:
            raise BadRequest(503, "no model loaded yet: the deployment's user_config names none ({model: URL})")
        if path == "/healthz":
            return JSONResponse({"status": "ok", "model_version": scorer.classifier.version})
        if not authorized(request.headers.get("authorization"), self.settings.token_sha256):
            raise BadRequest(401, "this route needs `Authorization: Bearer TOKEN` with the server's token")
        if path == "/model":
            batching = {"max_batch_size": self.batching.max_batch_size, "batch_wait_ms": self.batching.batch_wait_ms}
            return JSONResponse({**describe(scorer), **batching})
        parsed = parse_classify(await read_body(request, self.settings.max_body_bytes), self.settings.max_texts)
        results, scorer = await self.classify_batch((parsed.texts, parsed.statuses)) if parsed.texts else ([], scorer)
        if parsed.ids is not None:
            results = [{"id": message_id, **result} for message_id, result in zip(parsed.ids, results)]
        return JSONResponse({"model": scorer.model_name, "model_version": scorer.classifier.version,
                             "precision": scorer.precision.precision, "results": results})

    # (reconfigure sets both from the user_config before any request arrives)
    @serve.batch(max_batch_size=ModelSettings.max_batch_size, batch_wait_timeout_s=ModelSettings.batch_wait_ms / 1000,
                 batch_size_fn=messages_in)
    async def classify_batch(self, requests: list[tuple[list, list]]) -> list[tuple[list[dict], Scorer]]:
        scorer = self.scorer  # one model for the whole batch, named in each of its responses
        texts = [text for texts, _ in requests for text in texts]
        statuses = [status for _, statuses in requests for status in statuses]
        # In a thread: requests keep arriving (and are checked) while the model computes.
        results = await asyncio.to_thread(classify, scorer, texts, statuses)
        answers, start = [], 0
        for request_texts, _ in requests:
            answers.append((results[start:start + len(request_texts)], scorer))
            start += len(request_texts)
        return answers


def describe(scorer: Scorer) -> dict:
    """GET /model: what answers, and how it labels."""
    classifier = scorer.classifier
    point = classifier.operating_point
    return {"model": scorer.model_name, "model_version": classifier.version, "labels": classifier.labels,
            "positive_label": classifier.positive if point else None,
            "threshold": point.threshold_at(classifier.precision) if point else None,
            "precision": scorer.precision.precision, "precision_reason": scorer.precision.reason,
            "max_length": classifier.max_length}


# -- building and running the application ---------------------------------------------------------
def app_builder(args: dict) -> serve.Application:
    """`import_path: spamray.serve:app_builder` in a Serve config file: `args` are the
    ReplicaSettings; the deployment's options, its user_config among them, come from the file."""
    names = [field.name for field in dataclasses.fields(ReplicaSettings)]
    unknown = sorted(set(args or {}) - set(names))
    if unknown:
        raise ValueError(f"unknown args {unknown} for spamray.serve:app_builder; they are {names}")
    return Classifier.bind(ReplicaSettings(**(args or {})))


def replica_settings(cfg: ServeConfig, token_sha256: str | None) -> ReplicaSettings:
    return ReplicaSettings(cpus=cfg.cpus_per_replica, precision=cfg.precision, max_texts=cfg.max_texts,
                           max_body_bytes=cfg.max_body_bytes, token_sha256=token_sha256)


def deployment_options(cfg: ServeConfig, gpus: int = 0) -> dict:
    """The deployment's options: replicas or autoscaling, each replica's resources, and the
    user_config (ModelSettings)."""
    user_config = dataclasses.asdict(ModelSettings(cfg.model, cfg.max_batch_size, cfg.batch_wait_ms))
    # Room for a batch being scored and the next one gathering: @serve.batch fills a batch only
    # from requests the replica already holds.
    options = {"max_ongoing_requests": 2 * cfg.max_batch_size, "user_config": user_config,
               "ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": gpus}}
    if cfg.autoscale:
        low, high = autoscale_bounds(cfg.autoscale)
        # More replicas past 32 ongoing requests each: in bench/serve.py one replica gained no
        # throughput from 32 to 128 concurrent 1-message requests, only latency.
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": 32}
    else:
        options["num_replicas"] = cfg.replicas
    return options


def read_token(token_file: str | None) -> str | None:
    """The bearer token: --token-file's, else SPAMRAY_SERVE_TOKEN's, else none (no auth)."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV, "").strip() or None
    token = Path(token_file).read_text().strip()
    if not token:
        raise ValueError(f"--token-file {token_file} is empty: write the token into it")
    return token


def token_digest(token: str | None) -> str | None:
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def serve_config_document(cfg: ServeConfig, token_sha256: str | None, gpus: int = 0) -> dict:
    """The Serve config file (`serve deploy FILE`) of these options: change user_config.model and
    deploy it again to roll a new model out in place."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port, "request_timeout_s": REQUEST_TIMEOUT_S},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": "spamray.serve:app_builder",
            "args": dataclasses.asdict(replica_settings(cfg, token_sha256)),
            "deployments": [{"name": DEPLOYMENT_NAME, **deployment_options(cfg, gpus)}],
        }],
    }


def run_application(cfg: ServeConfig, token_sha256: str | None, gpus: int = 0) -> None:
    """Starts Serve's proxies on cfg.host:cfg.port and deploys the classifier; returns once its
    replicas answer."""
    serve.start(http_options=serve_config_document(cfg, token_sha256, gpus)["http_options"])
    application = Classifier.options(**deployment_options(cfg, gpus)).bind(replica_settings(cfg, token_sha256))
    serve.run(application, name=APP_NAME, route_prefix="/")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_classifier(cfg: ServeConfig) -> None:
    """`spamray serve`: checks everything, then writes the config file (--config-out) or deploys
    and serves until interrupted (or, with --detach on a cluster, leaves it running)."""
    token_sha256 = token_digest(read_token(cfg.token_file))
    metadata = saved.read_metadata(cfg.model)  # a model that cannot load fails before anything is deployed
    if cfg.precision != "auto":  # (auto is each replica's own hardware; an explicit bf16 must have a threshold)
        resolve_precision(cfg.precision, on_gpu=False, operating_point=metadata.get("operating_point"),
                          exports=export_problems(metadata))
    if cfg.detach and not os.environ.get("RAY_ADDRESS"):
        raise ValueError("--detach leaves the application on a cluster: set RAY_ADDRESS (a local Ray ends with "
                         "this process)")
    if cfg.ingress == "haproxy" and (os.environ.get("RAY_ADDRESS") or cfg.config_out):
        raise ValueError("--ingress haproxy applies to the local Ray spamray starts; a cluster's ingress is the "
                         "cluster's own: start its nodes with RAY_SERVE_ENABLE_HA_PROXY=1")
    if not is_loopback(cfg.host) and token_sha256 is None:
        logging.getLogger(__name__).warning(f"serving on {cfg.host} with no token: anyone who reaches the port can "
                                            "classify (--token-file, or the cluster's ingress with TLS)")
    if cfg.config_out:
        import yaml

        document = serve_config_document(cfg, token_sha256, gpus=int(bool(cfg.use_gpu)))
        Path(cfg.config_out).write_text(yaml.safe_dump(document, sort_keys=False))
        print(f"Serve config for {cfg.model} written to {cfg.config_out}: `serve deploy {cfg.config_out}`")
        return
    if cfg.ingress == "haproxy":  # read by Serve's controller, which the local Ray starts with this environment
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        logging.getLogger(__name__).warning(f"HAProxy takes the requests in on {cfg.host}:{cfg.port}, and opens its "
                                            "stats (8404) and metrics (9101) ports on every interface")
    start_ray()
    import ray

    gpus = int(cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0)
    run_application(cfg, token_sha256, gpus)
    print(f"serving {cfg.model} (version {saved.model_version(metadata)}) at http://{cfg.host}:{cfg.port}: "
          "POST /classify, GET /healthz, GET /model", flush=True)
    if cfg.detach:
        return
    wait_for_stop_signal()
    serve.delete(APP_NAME) if os.environ.get("RAY_ADDRESS") else serve.shutdown()


def wait_for_stop_signal() -> None:
    stopped = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stopped.set())
    stopped.wait()
