"""A fake OpenAI-compatible provider for tests, benchmarks and the demo: deterministic answers, every request recorded.

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

More routes, in each provider's wire format, with usage that follows the request (`count_input_tokens`
below is the independent input count; one word `wN` = one output token everywhere). The root
`up.root_url` ("http://127.0.0.1:<port>", no /v1) is what the anthropic and cohere providers and the
proxy's /openai/... and /anthropic/... pass-through routes need, since they append /v1/... themselves.

- chat, `n`: n choices, each with the same words; `completion_tokens = n * completion_tokens_for(body)`
  (streams: each word step sends one chunk per choice index). `prompt_tokens` stays PROMPT_TOKENS unless
  the last user text contains `COUNTINPUT`: then `prompt_tokens = count_input_tokens(body)`.
- POST /v1/completions (legacy text completions): `prompt` a string, a list of strings, a token list or
  a list of token lists; `n` choices per prompt (index = prompt_index * n + j); words per choice =
  min(`max_tokens`, cap), where an absent `max_tokens` means TEXT_COMPLETION_DEFAULT_MAX_TOKENS (16, as
  OpenAI) and cap is MAX_COMPLETION_TOKENS (SLOW_MAX_COMPLETION_TOKENS when a prompt has SLOWSTREAM);
  finish_reason "length" when max_tokens < cap. `usage.prompt_tokens = prompt_tokens_of_completion(body)`
  (the prompt texts' token counts, a token list's length; no per-prompt overhead), `completion_tokens =
  prompts * n * words`. `stream`: `{"object": "text_completion", "choices": [{"text", "index",
  "logprobs", "finish_reason"}]}` chunks (one per word per choice, then one with the finish_reason and
  text ""), then with `stream_options.include_usage` a `choices: []` chunk with usage, then [DONE].
- POST /v1/responses (OpenAI Responses API): `usage = {input_tokens: count_input_tokens(body),
  output_tokens: words, total_tokens, input_tokens_details: {cached_tokens: 0}, output_tokens_details:
  {reasoning_tokens: 0}}`, words = min(`max_output_tokens`, cap) (cap 40, SLOWSTREAM 200); one
  `message` output item with one `output_text`. A client limit below the cap makes the response
  `status: "incomplete"` (`incomplete_details.reason: "max_output_tokens"`), as OpenAI does. `stream`:
  `event:`/`data:` SSE response.created, response.in_progress, response.output_item.added,
  response.content_part.added, response.output_text.delta (one per word), response.output_text.done,
  response.content_part.done, response.output_item.done, then response.completed (response.incomplete
  when cut short) carrying the full response and its usage; each event has a `sequence_number`.
- POST /v1/messages (Anthropic Messages, what the anthropic provider and /anthropic pass-through send):
  `max_tokens` is required (400 otherwise, as Anthropic); words = min(max_tokens, cap); `usage =
  {input_tokens: count_input_tokens(body), output_tokens: words, cache_creation_input_tokens: 0,
  cache_read_input_tokens: 0}` (prompts here are far below any cache minimum, so cache_control changes
  nothing); stop_reason "max_tokens" when cut short, else "end_turn". `stream`: `event:`/`data:` SSE
  message_start (usage.input_tokens, and output_tokens 1 as the real API sends), content_block_start,
  ping, one content_block_delta text_delta per word, content_block_stop, message_delta (stop_reason,
  usage.output_tokens = words, the cumulative total), message_stop. Errors use Anthropic's error JSON.
- POST /v1/images/generations (gpt-image-1): `n` images of a 1x1 PNG as `b64_json`; `usage =
  {input_tokens: text_tokens, output_tokens: n * IMAGE_OUTPUT_TOKENS[quality][size], total_tokens,
  input_tokens_details: {text_tokens, image_tokens: 0}}` with text_tokens = litellm.token_counter of
  the prompt; quality "auto"/absent counts as "medium" (OpenAI's table; "standard" -> medium, "hd" ->
  high), size "auto"/absent as 1024x1024; another size is a 400.
- POST /v1/audio/speech: `len(input) * SPEECH_BYTES_PER_CHAR` bytes of fake audio (audio/mpeg for
  mp3, the default); OpenAI bills tts per input character, so nothing else to report.
- POST /v1/audio/transcriptions (multipart with `file`): the audio's duration comes from its WAV header
  (else `size / 32000` s); the text is `ceil(2 * duration)` words; json -> `{"text", "usage": {"type":
  "duration", "seconds": ceil(duration)}}`, verbose_json adds task, language, `duration` (exact) and one
  segment; text/srt/vtt -> plain text. `wav_bytes(seconds)` builds a real WAV to upload.
- POST /v1/rerank and /v2/rerank (Cohere; LiteLLM's cohere provider posts to {api_base}/v2/rerank, or
  /v1/rerank for a v1 api_base): results sorted by relevance (document i scores 1 - i/(len+1)),
  `top_n`, `return_documents`; `meta.billed_units.search_units = ceil(len(documents) / 100)` (1 up to
  100 documents, as Cohere bills).
- `RecordedRequest.body` for multipart requests: the form fields as a dict; a file field is
  `{"filename", "content_type", "size"}` (no bytes).
- Every route: HTTP 500 (in its provider's error format) when the model ends with `-fail` or the last
  user text (prompt, input, query) contains FAIL500.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import socket
import struct
import threading
import time
import uuid
import warnings
import wave
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    "EMBEDDING_DIM",
    "EMBEDDING_TOKENS_PER_INPUT",
    "IMAGE_OUTPUT_TOKENS",
    "MAX_COMPLETION_TOKENS",
    "PROMPT_TOKENS",
    "SLOW_CHUNK_DELAY_S",
    "SLOW_MAX_COMPLETION_TOKENS",
    "SPEECH_BYTES_PER_CHAR",
    "TEXT_COMPLETION_DEFAULT_MAX_TOKENS",
    "TOKENS_PER_ITEM",
    "TOKENS_REPLY_PRIMING",
    "FakeUpstream",
    "RecordedRequest",
    "anthropic_output_tokens_for",
    "completion_tokens_for",
    "count_input_tokens",
    "expected_content",
    "image_usage_for",
    "prompt_tokens_of_completion",
    "responses_output_tokens_for",
    "text_completion_tokens_for",
    "token_count",
    "transcription_duration_s",
    "wav_bytes",
]

PROMPT_TOKENS = 25
MAX_COMPLETION_TOKENS = 40
SLOW_MAX_COMPLETION_TOKENS = 200
SLOW_CHUNK_DELAY_S = 0.1
EMBEDDING_TOKENS_PER_INPUT = 8
EMBEDDING_DIM = 8
CREATED = 1_700_000_000
TEXT_COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
TOKENS_PER_ITEM = 4  # count_input_tokens: overhead per message / input item / system prompt
TOKENS_REPLY_PRIMING = 3  # count_input_tokens: once per request
SPEECH_BYTES_PER_CHAR = 32
# gpt-image-1 output tokens per image, OpenAI's published table: quality -> size -> tokens
IMAGE_OUTPUT_TOKENS: dict[str, dict[str, int]] = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
_IMAGE_QUALITY_ALIASES = {None: "medium", "auto": "medium", "standard": "medium", "hd": "high"}
# a 1x1 transparent PNG
_PNG_1X1 = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
        "0000000b49444154789c6360000200000500017a5eab3f0000000049454e44ae426082"
    )
).decode()


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


def _usage(completion: int, prompt: int = PROMPT_TOKENS) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _error(status: int, message: str, type_: str = "server_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": None}}, status_code=status)


# -- input counting and per-route usage (module level so tests can compute the expected numbers) -------------

_token_counter_lock = threading.Lock()
_token_counter: Callable[..., int] | None = None


def token_count(model: str, text: str) -> int:
    """`litellm.token_counter(model=model, text=text)`.

    litellm is imported on first use (its import-time warnings silenced), with LITELLM_LOCAL_MODEL_COST_MAP
    defaulted to "True" in this process (else the import fetches the price map from the internet; ~10 s
    of retries offline).
    """
    global _token_counter
    if not text:
        return 0
    if _token_counter is None:
        with _token_counter_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            import litellm

            _token_counter = litellm.token_counter
    return int(_token_counter(model=model, text=text))


def _content_texts(content: Any) -> list[str]:
    """The text fragments of a message/item content in any form: a string; OpenAI content parts (text,
    input_text, output_text); Anthropic blocks (text, tool_use -> name + json.dumps(input), tool_result ->
    its content, recursively). Images, audio and files carry no text and count nothing here."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        return [str(content)]
    out: list[str] = []
    for part in content:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, dict):
            kind = part.get("type")
            if isinstance(part.get("text"), str):
                out.append(part["text"])
            elif kind == "tool_use":
                out += [str(part.get("name", "")), json.dumps(part.get("input", {}), sort_keys=True)]
            elif kind == "tool_result":
                out += _content_texts(part.get("content"))
    return out


def _item_texts(item: Any) -> list[str]:
    """Text fragments of one chat/Anthropic message or Responses input item."""
    if not isinstance(item, dict):
        return _content_texts(item)
    out = _content_texts(item.get("content"))
    for call in item.get("tool_calls") or []:  # chat: an assistant message's tool calls
        function = (call or {}).get("function") or {}
        out += [str(function.get("name", "")), str(function.get("arguments", ""))]
    if item.get("type") == "function_call":  # Responses: a tool call item
        out += [str(item.get("name", "")), str(item.get("arguments", ""))]
    if item.get("type") == "function_call_output":
        out += _content_texts(item.get("output"))
    return [t for t in out if t]


def count_input_tokens(body: dict[str, Any]) -> int:
    """An independent count of every input a chat / Responses / Anthropic Messages request is billed for.

    `litellm.token_counter(model=body["model"], text=fragment)` summed over every text fragment:
    `system` (string or text blocks), `instructions`, each of `messages` / `input` (a string `input` is
    one item; any content form, see `_content_texts`; chat tool_calls and Responses function_call items
    count name + arguments, function_call_output its output), and `json.dumps(tool, sort_keys=True)` of
    each entry of `tools`; plus TOKENS_PER_ITEM (4) per message / input item / non-empty system or
    instructions, plus TOKENS_REPLY_PRIMING (3). So the same conversation counts the same in chat and
    Anthropic shape (a system message there = a top-level system here).
    """
    model = str(body.get("model") or "gpt-4o-mini")
    fragments: list[str] = []
    items = 0
    for key in ("system", "instructions"):
        texts = [t for t in _content_texts(body.get(key)) if t]
        if texts:
            items += 1
            fragments += texts
    for message in body.get("messages") or []:
        items += 1
        fragments += _item_texts(message)
    inp = body.get("input")
    if isinstance(inp, str):
        items += 1
        fragments.append(inp)
    elif isinstance(inp, list):
        for item in inp:
            items += 1
            fragments += _item_texts(item)
    for tool in body.get("tools") or []:
        fragments.append(json.dumps(tool, sort_keys=True))
    return sum(token_count(model, f) for f in fragments) + TOKENS_PER_ITEM * items + TOKENS_REPLY_PRIMING


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    return 1 if n is None else max(1, int(n))


def _responses_last_user_text(body: dict[str, Any]) -> str:
    inp = body.get("input")
    if isinstance(inp, str):
        return inp
    for item in reversed(inp if isinstance(inp, list) else []):
        if isinstance(item, dict) and item.get("role") == "user":
            return " ".join(_content_texts(item.get("content")))
    return ""


def _completion_prompts(body: dict[str, Any]) -> list[Any]:
    """The prompts of a /v1/completions body: a string or token list is one prompt, a list of them many."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt) if isinstance(prompt, list) else [str(prompt)]


def _completion_marker_text(body: dict[str, Any]) -> str:
    return " ".join(p for p in _completion_prompts(body) if isinstance(p, str))


def prompt_tokens_of_completion(body: dict[str, Any]) -> int:
    """/v1/completions prompt tokens: token_count of each prompt text (a token list counts its length)."""
    model = str(body.get("model") or "gpt-3.5-turbo-instruct")
    return sum(len(p) if isinstance(p, list) else token_count(model, str(p)) for p in _completion_prompts(body))


def _marker_cap(text: str) -> int:
    return SLOW_MAX_COMPLETION_TOKENS if "SLOWSTREAM" in text else MAX_COMPLETION_TOKENS


def text_completion_tokens_for(body: dict[str, Any]) -> int:
    """Words per choice a /v1/completions body gets: min(max_tokens or 16, cap)."""
    limit = body.get("max_tokens")
    limit = TEXT_COMPLETION_DEFAULT_MAX_TOKENS if limit is None else max(0, int(limit))
    return min(limit, _marker_cap(_completion_marker_text(body)))


def responses_output_tokens_for(body: dict[str, Any]) -> int:
    """Output words a /v1/responses body gets: min(max_output_tokens, cap), cap when absent."""
    cap = _marker_cap(_responses_last_user_text(body))
    limit = body.get("max_output_tokens")
    return cap if limit is None else min(max(0, int(limit)), cap)


def anthropic_output_tokens_for(body: dict[str, Any]) -> int:
    """Output words an Anthropic /v1/messages body gets: min(max_tokens, cap)."""
    return min(max(0, int(body.get("max_tokens") or 0)), _cap(body))


def _image_quality_size(body: dict[str, Any]) -> tuple[str, str]:
    quality = body.get("quality")
    quality = _IMAGE_QUALITY_ALIASES.get(quality, quality)
    size = body.get("size")
    size = "1024x1024" if size in (None, "auto") else str(size)
    return str(quality), size


def image_usage_for(body: dict[str, Any]) -> dict[str, Any]:
    """The gpt-image-1 usage block for an /v1/images/generations body (KeyError on an unknown quality/size)."""
    quality, size = _image_quality_size(body)
    output = IMAGE_OUTPUT_TOKENS[quality][size] * _choices(body)
    text = token_count(str(body.get("model") or "gpt-image-1"), str(body.get("prompt", "")))
    return {
        "input_tokens": text,
        "output_tokens": output,
        "total_tokens": text + output,
        "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
    }


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    """A real mono 16-bit PCM WAV of `seconds` of silence (`round(seconds * rate)` frames)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * round(seconds * rate))
    return buf.getvalue()


def transcription_duration_s(data: bytes) -> float:
    """The audio's duration: frames / rate from a WAV header, else `len(data) / 32000` (16 kHz 16-bit)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            return w.getnframes() / float(w.getframerate())
    except (wave.Error, EOFError, ValueError):
        return len(data) / 32000.0


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\n".encode() + _sse(payload)


def _anthropic_error(status: int, message: str, type_: str = "api_error") -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": type_, "message": message}}, status_code=status)


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
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1/images/generations", self._images, methods=["POST"]),
                Route("/v1/audio/speech", self._speech, methods=["POST"]),
                Route("/v1/audio/transcriptions", self._transcriptions, methods=["POST"]),
                Route("/v1/rerank", self._rerank, methods=["POST"]),
                Route("/v2/rerank", self._rerank, methods=["POST"]),
            ]
        )

    # -- test-facing API ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        """`http://127.0.0.1:<port>` (no /v1): for providers and pass-through routes that append /v1/... themselves."""
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot (copy) of the recorded requests, oldest first (every request but the model-list polls)."""
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

    async def _record(self, request: Request, files: dict[str, bytes] | None = None) -> RecordedRequest:
        """Record the request; a multipart form is recorded as a dict and its files' bytes go into `files`."""
        raw = await request.body()
        body: Any
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            body = {}
            async with request.form() as form:
                for name, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        data = await value.read()
                        if files is not None:
                            files[name] = data
                        body[name] = {"filename": value.filename, "content_type": value.content_type, "size": len(data)}
                    else:
                        body[name] = value
        else:
            try:
                body = json.loads(raw) if raw else None
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
        # Not recorded: a proxy polls the model list on its own schedule (nobody pays for it), and tests that
        # assert what reached the provider would see those polls land at random.
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
        choices = _choices(body)
        prompt = PROMPT_TOKENS
        if "COUNTINPUT" in _last_user_text(body):
            prompt = await asyncio.to_thread(count_input_tokens, body)
        if body.get("stream"):
            rec.stream = True
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            slow = "SLOWSTREAM" in _last_user_text(body)
            return StreamingResponse(
                self._stream(rec, request, cid, model, n, finish, include_usage, slow, choices, prompt),
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
                        "index": i,
                        "message": {"role": "assistant", "content": expected_content(n), "refusal": None},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                    for i in range(choices)
                ],
                "usage": _usage(n * choices, prompt),
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
        choices: int = 1,
        prompt: int = PROMPT_TOKENS,
    ) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish_reason: str | None = None, index: int = 0) -> bytes:
            payload: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if include_usage:
                payload["usage"] = None
            return _sse(payload)

        try:
            for index in range(choices):
                yield chunk({"role": "assistant", "content": "", "refusal": None}, index=index)
            for i in range(n):
                if not await self._pace(rec, request, slow):
                    return
                for index in range(choices):  # one chunk per choice for each word
                    yield chunk({"content": f"w{i}" if i == 0 else f" w{i}"}, index=index)
                rec.chunks_sent = i + 1
            for index in range(choices):
                yield chunk({}, finish, index=index)
            if include_usage:
                yield _sse(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": CREATED,
                        "model": model,
                        "system_fingerprint": "fp_fake",
                        "choices": [],
                        "usage": _usage(n * choices, prompt),
                    }
                )
            yield b"data: [DONE]\n\n"
            rec.completed = True
        except (asyncio.CancelledError, OSError):
            rec.disconnected = True
            raise

    async def _pace(self, rec: RecordedRequest, request: Request, slow: bool) -> bool:
        """Before a word chunk: wait SLOW_CHUNK_DELAY_S when `slow`; False when the stream must end (the
        client went away -> `rec.disconnected`, or the server is shutting down)."""
        if slow:
            await asyncio.sleep(SLOW_CHUNK_DELAY_S)
            if await request.is_disconnected():
                rec.disconnected = True
                return False
        return not self._stopping.is_set()

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

    # -- /v1/completions (legacy text completions) ------------------------------------------------

    async def _completions(self, request: Request) -> Response:
        rec = await self._record(request)
        body = rec.body
        if not isinstance(body, dict) or "prompt" not in body:
            rec.status = 400
            return _error(400, "prompt is required", "invalid_request_error")
        model = str(body.get("model", "unknown"))
        marker = _completion_marker_text(body)
        if model.endswith("-fail") or "FAIL500" in marker:
            rec.status = 500
            rec.completed = True
            return _error(500, "fake upstream failure (FAIL500 / -fail model)")
        words = text_completion_tokens_for(body)
        limit = body.get("max_tokens")
        limit = TEXT_COMPLETION_DEFAULT_MAX_TOKENS if limit is None else max(0, int(limit))
        finish = "length" if limit < _marker_cap(marker) else "stop"
        total_choices = len(_completion_prompts(body)) * _choices(body)
        usage = _usage(words * total_choices, await asyncio.to_thread(prompt_tokens_of_completion, body))
        cid = f"cmpl-fake-{uuid.uuid4().hex[:16]}"
        if body.get("stream"):
            rec.stream = True
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._completions_stream(
                    rec, request, cid, model, words, total_choices, finish, usage, include_usage, "SLOWSTREAM" in marker
                ),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        rec.completed = True
        return JSONResponse(
            {
                "id": cid,
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": [
                    {"text": expected_content(words), "index": i, "logprobs": None, "finish_reason": finish}
                    for i in range(total_choices)
                ],
                "usage": usage,
            }
        )

    async def _completions_stream(
        self,
        rec: RecordedRequest,
        request: Request,
        cid: str,
        model: str,
        words: int,
        total_choices: int,
        finish: str,
        usage: dict[str, int],
        include_usage: bool,
        slow: bool,
    ) -> AsyncIterator[bytes]:
        def chunk(text: str, index: int, finish_reason: str | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": cid,
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}],
            }
            if include_usage:
                payload["usage"] = None
            return _sse(payload)

        try:
            for i in range(words):
                if not await self._pace(rec, request, slow):
                    return
                for index in range(total_choices):
                    yield chunk(f"w{i}" if i == 0 else f" w{i}", index)
                rec.chunks_sent = i + 1
            for index in range(total_choices):
                yield chunk("", index, finish)
            if include_usage:
                yield _sse(
                    {
                        "id": cid,
                        "object": "text_completion",
                        "created": CREATED,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield b"data: [DONE]\n\n"
            rec.completed = True
        except (asyncio.CancelledError, OSError):
            rec.disconnected = True
            raise

    # -- /v1/responses (OpenAI Responses API) -----------------------------------------------------

    async def _responses(self, request: Request) -> Response:
        rec = await self._record(request)
        body = rec.body
        if not isinstance(body, dict):
            rec.status = 400
            return _error(400, "body must be a JSON object", "invalid_request_error")
        model = str(body.get("model", "unknown"))
        marker = _responses_last_user_text(body)
        if model.endswith("-fail") or "FAIL500" in marker:
            rec.status = 500
            rec.completed = True
            return _error(500, "fake upstream failure (FAIL500 / -fail model)")
        words = responses_output_tokens_for(body)
        limit = body.get("max_output_tokens")
        incomplete = limit is not None and int(limit) < _marker_cap(marker)
        input_tokens = await asyncio.to_thread(count_input_tokens, body)
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": words,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + words,
        }
        rid = f"resp_fake{uuid.uuid4().hex}"
        mid = f"msg_fake{uuid.uuid4().hex}"
        status = "incomplete" if incomplete else "completed"
        text = expected_content(words)

        def part(text: str) -> dict[str, Any]:
            return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

        def item(item_status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
            return {"id": mid, "type": "message", "status": item_status, "content": content, "role": "assistant"}

        def response(
            resp_status: str, output: list[dict[str, Any]], resp_usage: dict[str, Any] | None
        ) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "response",
                "created_at": CREATED,
                "status": resp_status,
                "background": False,
                "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if resp_status == "incomplete" else None,
                "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"),
                "max_tool_calls": None,
                "model": model,
                "output": output,
                "parallel_tool_calls": True,
                "previous_response_id": body.get("previous_response_id"),
                "reasoning": {"effort": None, "summary": None},
                "service_tier": "default",
                "store": body.get("store", True),
                "temperature": body.get("temperature", 1.0),
                "text": {"format": {"type": "text"}, "verbosity": "medium"},
                "tool_choice": body.get("tool_choice", "auto"),
                "tools": body.get("tools") or [],
                "top_logprobs": 0,
                "top_p": body.get("top_p", 1.0),
                "truncation": "disabled",
                "usage": resp_usage,
                "user": None,
                "metadata": body.get("metadata") or {},
            }

        final = response(status, [item(status, [part(text)])], usage)
        if not body.get("stream"):
            rec.completed = True
            return JSONResponse(final)
        rec.stream = True
        slow = "SLOWSTREAM" in marker

        async def events() -> AsyncIterator[bytes]:
            seq = 0

            def event(name: str, **fields: Any) -> bytes:
                nonlocal seq
                payload = {"type": name, "sequence_number": seq, **fields}
                seq += 1
                return _event(name, payload)

            where = {"item_id": mid, "output_index": 0, "content_index": 0}
            try:
                yield event("response.created", response=response("in_progress", [], None))
                yield event("response.in_progress", response=response("in_progress", [], None))
                yield event("response.output_item.added", output_index=0, item=item("in_progress", []))
                yield event("response.content_part.added", **where, part=part(""))
                for i in range(words):
                    if not await self._pace(rec, request, slow):
                        return
                    yield event(
                        "response.output_text.delta", **where, delta=f"w{i}" if i == 0 else f" w{i}", logprobs=[]
                    )
                    rec.chunks_sent = i + 1
                yield event("response.output_text.done", **where, text=text, logprobs=[])
                yield event("response.content_part.done", **where, part=part(text))
                yield event("response.output_item.done", output_index=0, item=item(status, [part(text)]))
                yield event("response.incomplete" if incomplete else "response.completed", response=final)
                rec.completed = True
            except (asyncio.CancelledError, OSError):
                rec.disconnected = True
                raise

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    # -- /v1/messages (Anthropic Messages API) ----------------------------------------------------

    async def _messages(self, request: Request) -> Response:
        rec = await self._record(request)
        body = rec.body
        if not isinstance(body, dict):
            rec.status = 400
            return _anthropic_error(400, "body must be a JSON object", "invalid_request_error")
        if body.get("max_tokens") is None:
            rec.status = 400
            return _anthropic_error(400, "max_tokens: Field required", "invalid_request_error")
        model = str(body.get("model", "unknown"))
        if _should_fail(body):
            rec.status = 500
            rec.completed = True
            return _anthropic_error(500, "fake upstream failure (FAIL500 / -fail model)")
        words = anthropic_output_tokens_for(body)
        stop = "max_tokens" if int(body["max_tokens"]) < _cap(body) else "end_turn"
        input_tokens = await asyncio.to_thread(count_input_tokens, body)
        mid = f"msg_fake{uuid.uuid4().hex[:24]}"
        text = expected_content(words)

        def message(content: list[dict[str, Any]], stop_reason: str | None, output_tokens: int) -> dict[str, Any]:
            return {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": input_tokens,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "output_tokens": output_tokens,
                    "service_tier": "standard",
                },
            }

        if not body.get("stream"):
            rec.completed = True
            return JSONResponse(message([{"type": "text", "text": text}], stop, words))
        rec.stream = True
        slow = "SLOWSTREAM" in _last_user_text(body)

        async def events() -> AsyncIterator[bytes]:
            try:
                yield _event("message_start", {"type": "message_start", "message": message([], None, 1)})
                yield _event(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                )
                yield _event("ping", {"type": "ping"})
                for i in range(words):
                    if not await self._pace(rec, request, slow):
                        return
                    delta = {"type": "text_delta", "text": f"w{i}" if i == 0 else f" w{i}"}
                    yield _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
                    rec.chunks_sent = i + 1
                yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
                yield _event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop, "stop_sequence": None},
                        "usage": {"output_tokens": words},
                    },
                )
                yield _event("message_stop", {"type": "message_stop"})
                rec.completed = True
            except (asyncio.CancelledError, OSError):
                rec.disconnected = True
                raise

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    # -- images, audio, rerank ----------------------------------------------------------------------

    async def _images(self, request: Request) -> Response:
        rec = await self._record(request)
        body = rec.body
        if not isinstance(body, dict) or not body.get("prompt"):
            rec.status = 400
            return _error(400, "prompt is required", "invalid_request_error")
        model = str(body.get("model", "unknown"))
        if model.endswith("-fail") or "FAIL500" in str(body["prompt"]):
            rec.status = 500
            rec.completed = True
            return _error(500, "fake upstream failure (FAIL500 / -fail model)")
        quality, size = _image_quality_size(body)
        if size not in IMAGE_OUTPUT_TOKENS.get(quality, {}):
            rec.status = 400
            return _error(400, f"unsupported quality/size {quality!r}/{size!r}", "invalid_request_error")
        usage = await asyncio.to_thread(image_usage_for, body)
        rec.completed = True
        return JSONResponse(
            {
                "created": CREATED,
                "background": "opaque",
                "data": [{"b64_json": _PNG_1X1} for _ in range(_choices(body))],
                "output_format": "png",
                "quality": quality,
                "size": size,
                "usage": usage,
            }
        )

    async def _speech(self, request: Request) -> Response:
        rec = await self._record(request)
        body = rec.body
        if not isinstance(body, dict) or not isinstance(body.get("input"), str):
            rec.status = 400
            return _error(400, "input is required", "invalid_request_error")
        model = str(body.get("model", "unknown"))
        if model.endswith("-fail") or "FAIL500" in body["input"]:
            rec.status = 500
            rec.completed = True
            return _error(500, "fake upstream failure (FAIL500 / -fail model)")
        fmt = str(body.get("response_format") or "mp3")
        media = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac"}
        media |= {"wav": "audio/wav", "pcm": "audio/pcm"}
        data = (b"\xff\xf3\x14\xc4" * SPEECH_BYTES_PER_CHAR)[:SPEECH_BYTES_PER_CHAR] * len(body["input"])
        rec.completed = True
        return Response(data, media_type=media.get(fmt, "application/octet-stream"))

    async def _transcriptions(self, request: Request) -> Response:
        files: dict[str, bytes] = {}
        rec = await self._record(request, files)
        body = rec.body
        if not isinstance(body, dict) or "file" not in files:
            rec.status = 400
            return _error(400, "file is required (multipart/form-data)", "invalid_request_error")
        if str(body.get("model", "")).endswith("-fail"):
            rec.status = 500
            rec.completed = True
            return _error(500, "fake upstream failure (-fail model)")
        duration = transcription_duration_s(files["file"])
        text = expected_content(math.ceil(2 * duration))
        usage = {"type": "duration", "seconds": math.ceil(duration)}
        fmt = str(body.get("response_format") or "json")
        rec.completed = True
        if fmt == "json":
            return JSONResponse({"text": text, "usage": usage})
        if fmt == "verbose_json":
            segment = {
                "id": 0,
                "seek": 0,
                "start": 0.0,
                "end": duration,
                "text": text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": -0.1,
                "compression_ratio": 1.0,
                "no_speech_prob": 0.0,
            }
            return JSONResponse(
                {
                    "task": "transcribe",
                    "language": "english",
                    "duration": duration,
                    "text": text,
                    "segments": [segment],
                    "usage": usage,
                }
            )
        return PlainTextResponse(text + "\n")

    async def _rerank(self, request: Request) -> Response:
        rec = await self._record(request)
        body = rec.body
        if not isinstance(body, dict) or "query" not in body or not isinstance(body.get("documents"), list):
            rec.status = 400
            return JSONResponse({"message": "query and documents are required"}, status_code=400)
        model = str(body.get("model", "unknown"))
        if model.endswith("-fail") or "FAIL500" in str(body["query"]):
            rec.status = 500
            rec.completed = True
            return JSONResponse({"message": "fake upstream failure (FAIL500 / -fail model)"}, status_code=500)
        docs = body["documents"]
        top_n = body.get("top_n") or len(docs)
        results: list[dict[str, Any]] = []
        for i in range(min(int(top_n), len(docs))):
            result: dict[str, Any] = {"index": i, "relevance_score": round(1 - i / (len(docs) + 1), 6)}
            if body.get("return_documents"):
                result["document"] = {"text": docs[i]} if isinstance(docs[i], str) else docs[i]
            results.append(result)
        version = "2" if request.url.path.startswith("/v2/") else "1"
        rec.completed = True
        return JSONResponse(
            {
                "id": str(uuid.uuid4()),
                "results": results,
                "meta": {
                    "api_version": {"version": version},
                    "billed_units": {"search_units": max(1, math.ceil(len(docs) / 100))},
                },
            }
        )


def main(argv: list[str] | None = None) -> None:
    """Serve the fake provider until interrupted, for trying the proxy without keys (README, step 1):

    .venv/bin/python -m cycles_litellm.fake_provider --port 4001
    """
    import argparse

    parser = argparse.ArgumentParser(description="A fake OpenAI/Anthropic-compatible provider on loopback.")
    parser.add_argument("--port", type=int, default=4001)
    args = parser.parse_args(argv)
    with FakeUpstream(port=args.port) as up:
        print(f"fake provider on {up.root_url}: UPSTREAM_API_BASE={up.base_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
