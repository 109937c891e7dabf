"""A fake OpenAI-compatible upstream for end-to-end tests: deterministic answers, every request recorded.

    with FakeUpstream() as up:          # uvicorn in a daemon thread on 127.0.0.1:<free port>
        up.base_url                     # "http://127.0.0.1:<port>/v1" -> UPSTREAM_API_BASE
        ...                             # point a LiteLLM proxy at it
        up.requests[-1].body["max_tokens"]
        up.clear()

Deterministic numbers (the module constants, so tests can compute exact costs):

- chat, every request: `usage.prompt_tokens = PROMPT_TOKENS` (25), whatever the messages are.
- chat: `completion_tokens = min(limit, MAX_COMPLETION_TOKENS)` (40) where `limit` is the first of
  `max_tokens`, `max_completion_tokens` that is present and not null, else 40. The answer is that many
  words `w0 w1 w2 ...`, one word = one token; `finish_reason` is "length" when the client's limit cut
  it short, else "stop". `total_tokens = prompt + completion`.
- chat, `stream: true`: SSE in OpenAI's format - a role chunk (`delta: {role: assistant, content: ""}`),
  one chunk per word (`"w0"`, `" w1"`, ... so the joined deltas equal the non-streamed content), a chunk
  with `finish_reason` and an empty delta, then, only when `stream_options.include_usage` is true, a
  chunk with `choices: []` and the `usage` (earlier chunks then carry `usage: null`), then
  `data: [DONE]`.
- embeddings: `EMBEDDING_TOKENS_PER_INPUT` (8) prompt tokens per input string (or token list);
  `usage = {prompt_tokens: 8 * n, total_tokens: 8 * n}`; each vector has `EMBEDDING_DIM` (8) floats,
  returned as a float list, or base64 float32 when `encoding_format: base64` (what the openai client asks).

Controls:

- HTTP 500 when the upstream model name ends with `-fail` (LiteLLM strips the `openai/` prefix, so a
  deployment `openai/gpt-4o-mini-fail` arrives as `gpt-4o-mini-fail`; embeddings too) or when the last
  user message contains `FAIL500`, with OpenAI's error JSON. Note: LiteLLM's router retries a 500
  `openai.DEFAULT_MAX_RETRIES` (2) times by default with ~1 s back-off, so with configs/litellm.yaml one
  client request makes 3 upstream attempts and takes ~5 s; set `router_settings: {num_retries: 0}` in a
  test's LiteLLM config for a single attempt.
- `SLOWSTREAM` in the last user message: the word cap is `SLOW_MAX_COMPLETION_TOKENS` (200) instead of
  40, and a stream waits `SLOW_CHUNK_DELAY_S` (0.1 s) before each word chunk - long enough for a client
  to abort mid-stream. A non-streamed SLOWSTREAM request answers at once (with up to 200 words).
- `up.requests`: a snapshot list of `RecordedRequest` (path, lower-cased headers, parsed JSON body,
  status sent, for streams `chunks_sent` and `completed`/`disconnected`); the objects are shared, so a
  stream's progress shows on an older snapshot too. `up.clear()` forgets them. `up.wait_for(pred)`
  polls until a recorded request satisfies `pred` (requests are recorded when they arrive).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    "EMBEDDING_DIM",
    "EMBEDDING_TOKENS_PER_INPUT",
    "MAX_COMPLETION_TOKENS",
    "PROMPT_TOKENS",
    "SLOW_CHUNK_DELAY_S",
    "SLOW_MAX_COMPLETION_TOKENS",
    "FakeUpstream",
    "RecordedRequest",
    "completion_tokens_for",
    "expected_content",
]

PROMPT_TOKENS = 25
MAX_COMPLETION_TOKENS = 40
SLOW_MAX_COMPLETION_TOKENS = 200
SLOW_CHUNK_DELAY_S = 0.1
EMBEDDING_TOKENS_PER_INPUT = 8
EMBEDDING_DIM = 8
CREATED = 1_700_000_000


@dataclass
class RecordedRequest:
    """One request as the upstream received it (mutable fields are updated while a stream runs)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    received_at: float = field(default_factory=time.time)
    status: int = 200
    stream: bool = False
    chunks_sent: int = 0  # word chunks written so far (streams only)
    completed: bool = False  # the whole response (for streams: up to [DONE]) was produced
    disconnected: bool = False  # a stream stopped because the client went away

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # content parts
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return ""
    return ""


def _cap(body: dict[str, Any]) -> int:
    return SLOW_MAX_COMPLETION_TOKENS if "SLOWSTREAM" in _last_user_text(body) else MAX_COMPLETION_TOKENS


def _client_limit(body: dict[str, Any]) -> int | None:
    limit = body.get("max_tokens")
    if limit is None:
        limit = body.get("max_completion_tokens")
    return None if limit is None else max(0, int(limit))


def completion_tokens_for(body: dict[str, Any]) -> int:
    """How many words/tokens the fake answers to this chat request body."""
    limit = _client_limit(body)
    return _cap(body) if limit is None else min(limit, _cap(body))


def expected_content(n_tokens: int) -> str:
    """The answer text for `n_tokens` completion tokens."""
    return " ".join(f"w{i}" for i in range(n_tokens))


def _should_fail(body: dict[str, Any]) -> bool:
    model = body.get("model")
    return (isinstance(model, str) and model.endswith("-fail")) or "FAIL500" in _last_user_text(body)


def _usage(completion: int) -> dict[str, int]:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion, "total_tokens": PROMPT_TOKENS + completion}


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _error(status: int, message: str, type_: str = "server_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": None}}, status_code=status)


class FakeUpstream:
    """Fake OpenAI API on 127.0.0.1 (a free port unless given); use as a context manager or start()/stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._stopping = threading.Event()  # ends running streams early so shutdown is quick
        self.port = 0
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    # -- test-facing API ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot (copy) of the recorded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def wait_for(
        self, predicate: Callable[[RecordedRequest], bool], timeout: float = 10.0, interval: float = 0.02
    ) -> RecordedRequest:
        """Poll until a recorded request satisfies `predicate`; return it, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            for rec in self.requests:
                if predicate(rec):
                    return rec
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no recorded request matched within {timeout} s ({len(self.requests)} recorded)")
            time.sleep(interval)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> FakeUpstream:
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when the listening
        # socket's proto is TCP; with proto 0, Nagle + delayed ACK add ~40 ms to every response.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        sock.listen(1024)
        self._socket = sock
        self._stopping.clear()
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=2,
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"fake-upstream-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- handlers -------------------------------------------------------------------------------

    async def _record(self, request: Request) -> RecordedRequest:
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        rec = RecordedRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        with self._lock:
            self._requests.append(rec)
        return rec

    async def _models(self, request: Request) -> Response:
        await self._record(request)
        names = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "private-model"]
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": n, "object": "model", "created": CREATED, "owned_by": "fake"} for n in names],
            }
        )

    async def _chat(self, request: Request) -> Response:
        rec = await self._record(request)
        body = rec.body
        if not isinstance(body, dict):
            rec.status = 400
            return _error(400, "body must be a JSON object", "invalid_request_error")
        if _should_fail(body):
            rec.status = 500
            rec.completed = True
            return _error(500, "fake upstream failure (FAIL500 / -fail model)")
        n = completion_tokens_for(body)
        limit = _client_limit(body)
        finish = "length" if limit is not None and limit < _cap(body) else "stop"  # cut short by the client
        model = str(body.get("model", "unknown"))
        cid = f"chatcmpl-fake-{uuid.uuid4().hex[:16]}"
        if body.get("stream"):
            rec.stream = True
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            slow = "SLOWSTREAM" in _last_user_text(body)
            return StreamingResponse(
                self._stream(rec, request, cid, model, n, finish, include_usage, slow),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        rec.completed = True
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": expected_content(n), "refusal": None},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": _usage(n),
            }
        )

    async def _stream(
        self,
        rec: RecordedRequest,
        request: Request,
        cid: str,
        model: str,
        n: int,
        finish: str,
        include_usage: bool,
        slow: bool,
    ) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if include_usage:
                payload["usage"] = None
            return _sse(payload)

        try:
            yield chunk({"role": "assistant", "content": "", "refusal": None})
            for i in range(n):
                if slow:
                    await asyncio.sleep(SLOW_CHUNK_DELAY_S)
                    if await request.is_disconnected():
                        rec.disconnected = True
                        return
                if self._stopping.is_set():
                    return  # server shutting down: end the stream without [DONE]
                yield chunk({"content": f"w{i}" if i == 0 else f" w{i}"})
                rec.chunks_sent = i + 1
            yield chunk({}, finish)
            if include_usage:
                yield _sse(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": CREATED,
                        "model": model,
                        "system_fingerprint": "fp_fake",
                        "choices": [],
                        "usage": _usage(n),
                    }
                )
            yield b"data: [DONE]\n\n"
            rec.completed = True
        except (asyncio.CancelledError, OSError):
            rec.disconnected = True
            raise

    async def _embeddings(self, request: Request) -> Response:
        rec = await self._record(request)
        body = rec.body
        if not isinstance(body, dict) or "input" not in body:
            rec.status = 400
            return _error(400, "input is required", "invalid_request_error")
        model = str(body.get("model", "unknown"))
        if model.endswith("-fail"):
            rec.status = 500
            return _error(500, "fake upstream failure (-fail model)")
        inp = body["input"]
        # a string, a list of strings, a token list (list of ints) or a list of token lists
        inputs = [inp] if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)) else inp
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i in range(len(inputs)):
            vector = [round((i + 1) * 0.01 * (d + 1), 6) for d in range(EMBEDDING_DIM)]
            embedding: Any = base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vector)).decode() if b64 else vector
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = EMBEDDING_TOKENS_PER_INPUT * len(inputs)
        rec.completed = True
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
