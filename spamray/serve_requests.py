"""What a /classify request carries and what it is answered, without Ray: the body read within its
limit and checked, the bearer token, and batch scoring's own steps over the request's messages."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

import pyarrow as pa
from starlette.requests import Request

from .errors import SpamrayError
from .inputs import STATUS_UNDECODABLE
from .replica import Scorer, tokenize_batch

EXAMPLE = '{"texts": ["a message", ...], "ids": [optional, one per text]}'


class BadRequest(SpamrayError):
    """What a client sent wrong: answered with `status` and this message, never a crash."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ClassifyRequest:
    texts: list[str | None]  # None where the text cannot be stored as UTF-8 (a lone surrogate)
    statuses: list[str | None]  # "undecodable" there; otherwise tokenize_batch decides
    ids: list[str | int] | None


def parse_classify(body: bytes, max_texts: int) -> ClassifyRequest:
    """A /classify body, checked: each way it can be wrong is a BadRequest that says how."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:  # (JSON and UTF-8 errors are ValueErrors; nesting too deep)
        raise BadRequest(400, f"the body is not JSON ({type(error).__name__}: {str(error)[:200]}); send {EXAMPLE}") from None
    if not isinstance(document, dict) or "texts" not in document:
        raise BadRequest(400, f"the body has no `texts` (it is {json_type(document)}); send {EXAMPLE}")
    unknown = sorted(set(document) - {"texts", "ids"})
    if unknown:
        raise BadRequest(400, f"unknown field(s) {unknown}: a request has `texts` and, optionally, `ids`")
    texts, ids = document["texts"], document.get("ids")
    if not isinstance(texts, list):
        raise BadRequest(400, f"`texts` is {json_type(texts)}, not a list of strings; send {EXAMPLE}")
    if len(texts) > max_texts:
        raise BadRequest(400, f"`texts` has {len(texts)} messages, more than one request may carry ({max_texts}, "
                              "--max-texts): send them in several requests")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadRequest(400, f"texts[{index}] is {json_type(text)}, not a string")
    if ids is not None:
        if not isinstance(ids, list) or len(ids) != len(texts):
            size = f" of {len(ids)}" if isinstance(ids, list) else ""
            raise BadRequest(400, f"`ids` is {json_type(ids)}{size}: give one id per text ({len(texts)}), or none")
        for index, value in enumerate(ids):
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise BadRequest(400, f"ids[{index}] is {json_type(value)}; an id is a string or an integer")
            if isinstance(value, str) and not utf8_encodable(value):  # it could not be sent back
                raise BadRequest(400, f"ids[{index}] is a string with a lone surrogate (no UTF-8 exists for it); "
                                      "send ids as valid Unicode")
    statuses = [None if utf8_encodable(text) else STATUS_UNDECODABLE for text in texts]
    return ClassifyRequest([text if status is None else None for text, status in zip(texts, statuses)], statuses, ids)


def json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def utf8_encodable(text: str) -> bool:
    """False for a string with a lone surrogate ("\\ud800" in JSON): no UTF-8 exists for it, as for
    the undecodable bytes batch scoring meets in a file, and it gets that status."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def classify(scorer: Scorer, texts: list[str | None], statuses: list[str | None]) -> list[dict]:
    """Batch scoring's steps over one list of messages: a result each (label, probabilities,
    status, tokens), in order; no label and no probabilities where a message was not scored."""
    batch = pa.table({"text": pa.array(texts, pa.string()), "status": pa.array(statuses, pa.string())})
    scored = scorer.score_batch(tokenize_batch(batch, scorer.classifier.max_length, keep_text=False))
    columns = scored.select(["label", "status", "n_tokens", *scorer.columns]).to_pydict()
    labels = scorer.classifier.labels
    results = []
    for row, label in enumerate(columns["label"]):
        probs = None if label is None else {name: columns[column][row] for name, column in zip(labels, scorer.columns)}
        results.append({"label": label, "probs": probs, "status": columns["status"][row],
                        "n_tokens": columns["n_tokens"][row]})
    return results


def authorized(header: str | None, token_sha256: str | None) -> bool:
    """Whether an Authorization header carries the bearer token (always, with no token set). The
    replica holds the token's sha256, so the secret is in no deployment config."""
    if token_sha256 is None:
        return True
    scheme, _, token = (header or "").partition(" ")
    presented = hashlib.sha256(token.strip().encode()).hexdigest()
    return scheme.lower() == "bearer" and hmac.compare_digest(presented, token_sha256)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) once it passes `limit` bytes: declared or streamed, it is never
    read whole first."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"the body has {int(declared):,} bytes, more than {limit:,} (--max-body-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, f"the body has more than {limit:,} bytes (--max-body-bytes)")
    return bytes(body)
