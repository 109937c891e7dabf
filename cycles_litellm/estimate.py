"""Worst-case cost of a call, from LiteLLM's own prices and token counter, in USD_MICROCENTS.

LiteLLM keeps prices as float USD per token; they are turned into exact integers (microcents per
million tokens) once, here, and all arithmetic after that is on integers. A price of 0 or none is
*unknown*, not free: such calls are denied (PRICE_UNKNOWN) unless cycles.yaml prices the model or
lists it as free.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import litellm

from cycles_ledger import SoftLanding

try:  # the parts litellm.token_counter is made of (LiteLLM 1.108.7), so that its set-up can be cached
    from litellm.litellm_core_utils.token_counter import _count_extra, _count_messages, _MessageCountParams
    from litellm.utils import convert_list_message_to_dict

    _FAST_COUNT = True
except ImportError:  # pragma: no cover - another LiteLLM: count through token_counter itself
    _FAST_COUNT = False

from .settings import Settings

__all__ = [
    "CAP_FIELDS",
    "token_hold",
    "IMAGE_TOKENS",
    "image_tokens",
    "moderation_is_free",
    "MIN_CAP",
    "Estimate",
    "Price",
    "PriceUnknown",
    "RequestInvalid",
    "fallback_groups",
    "prices_of_group",
    "cap_field",
    "cap_to_send",
    "set_cap",
    "cost_of_usage",
    "counting_model",
    "estimate_call",
    "output_cap",
    "price_of_group",
    "soft_landing",
]

_MICROCENTS_PER_USD = 10**8
_PER_MILLION = 10**6


class PriceUnknown(LookupError):
    """No trustworthy price for a model: the caller denies with reason PRICE_UNKNOWN."""


class RequestInvalid(ValueError):
    """A request the plugin cannot estimate (absurd counts, hostile nesting): refused with 400 REQUEST_INVALID."""


@dataclass(frozen=True, slots=True)
class Price:
    """USD_MICROCENTS per million tokens (exact integers) and the model's output ceiling."""

    input_per_million: int
    output_per_million: int
    max_output_tokens: int | None = None
    per_image: int = 0  # USD_MICROCENTS per generated image


@dataclass(frozen=True, slots=True)
class Estimate:
    amount: int  # worst case: input + output cap
    input_cost: int
    output_per_million: int
    output_cap: int
    input_tokens: int
    model: str  # the provider model priced (the dearest deployment)
    outputs: int = 1  # answers of up to output_cap tokens each (n choices x prompts)
    cap_field: str | None = None  # the request field a max-tokens clamp goes into on this route
    kind: str = "chat"  # the route kind estimated (routes.py)


def _per_million(usd_per_token: Any) -> int:
    if not usd_per_token:
        return 0
    return math.ceil(Decimal(str(usd_per_token)) * _MICROCENTS_PER_USD * _PER_MILLION)


def _tokens_cost(tokens: int, per_million: int) -> int:
    return -(-tokens * per_million // _PER_MILLION)  # ceiling: an estimate never undershoots


def model_info(model: str) -> Mapping[str, Any]:
    """LiteLLM's map entry for a deployment's model. `openai/gpt-3.5-turbo-instruct` is priced under its bare
    name only (the Router even registers the prefixed name with zero prices), so an entry without any price
    falls back to the bare name's. {} if unmapped."""
    found: Mapping[str, Any] = {}
    for name in (model, model.partition("/")[2]):
        if not name:
            continue
        try:
            info: Mapping[str, Any] = litellm.get_model_info(name)
        except Exception:  # noqa: BLE001 - LiteLLM raises several types for an unmapped model
            continue
        if any(v for k, v in info.items() if "cost_per" in k and isinstance(v, int | float)):
            return info
        found = found or info
    return found


def _litellm_price(model: str, params: Mapping[str, Any] | None = None) -> Price | None:
    params = params or {}
    inp, out = params.get("input_cost_per_token"), params.get("output_cost_per_token")
    info = model_info(model)
    inp = inp if inp is not None else info.get("input_cost_per_token")
    out = out if out is not None else info.get("output_cost_per_token")
    per_image = info.get("output_cost_per_image")
    if not inp and not out and not per_image:
        return None
    return Price(
        _per_million(inp),
        _per_million(out),
        info.get("max_output_tokens") or info.get("max_tokens"),
        math.ceil(Decimal(str(per_image)) * _MICROCENTS_PER_USD) if per_image else 0,
    )


_FALLBACK_KEYS = ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks")
_MAX_REQUEST_FALLBACKS = 16  # groups a request may name itself: a longer list is refused, never cut short

# Fields the estimate reads, or that choose what a provider bills (the model, the prompt, how many answers of
# how many tokens, server tools, stored context): they must sit at the top level of the request, where the
# estimate reads them and a clamp is written. LiteLLM merges `extra_body` over the body it sends (the OpenAI
# SDK's rule) and a request fallback entry over the call it falls back to, so there they would override what
# was held; such a request is refused (400 REQUEST_INVALID) rather than reserved for less than it may cost.
ESTIMATED_FIELDS = frozenset(
    {
        "model", "messages", "prompt", "suffix", "input", "instructions", "text", "system", "tools", "functions",
        "tool_choice", "response_format", "output_format", "n", "best_of", "max_tokens", "max_completion_tokens",
        "max_output_tokens", "service_tier", "modalities", "audio", "size", "quality", "query", "documents",
        "file", "thinking", "reasoning", "reasoning_effort", "previous_response_id", "conversation",
        "web_search_options", "max_tool_calls", "mcp_servers", "extra_body", *_FALLBACK_KEYS,
    }
)  # fmt: skip


def _overrides(where: str, value: Any, allowed: frozenset[str] = frozenset()) -> None:
    """Refuse a mapping (extra_body, a fallback entry) that would override a field the estimate read."""
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise RequestInvalid(f"{where} must be an object")
    named = sorted(str(k) for k in value if k in ESTIMATED_FIELDS and k not in allowed)
    if named:
        raise RequestInvalid(
            f"{where} may not set {', '.join(named)}: the budget estimate reads them at the top level of the "
            "request, so send them there"
        )


def _names(group: str) -> set[str]:
    """A group's name as LiteLLM matches fallback keys: as written and without its provider prefix."""
    return {group, group.split("/", 1)[-1]}


def _entry_targets(targets: Any) -> Iterable[str]:
    for t in targets if isinstance(targets, list) else [targets]:
        target = t.get("model") if isinstance(t, Mapping) else t  # {"model": ..., ...} targets too
        if isinstance(target, str):
            yield target


@dataclass(frozen=True)
class _FallbackIndex:
    """One fallback list, indexed: the targets of each key (in list order) under each name it matches (as
    written and without its provider prefix), and those of every group (`"*"`, a bare name, a `{"model": ...}`
    entry). Built for each request (linear in the list; a cached one could miss an edit made in place)."""

    keyed: tuple[tuple[str, ...], ...]
    by_name: Mapping[str, tuple[int, ...]]
    everyone: tuple[str, ...]

    @classmethod
    def of(cls, entries: Any) -> _FallbackIndex:
        keyed: list[tuple[str, ...]] = []
        by_name: dict[str, list[int]] = {}
        everyone: list[str] = []
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, str):
                everyone.append(entry)
            elif isinstance(entry, Mapping):
                if isinstance(entry.get("model"), str):
                    everyone.append(entry["model"])
                for key, targets in entry.items():
                    if key == "*":
                        everyone += _entry_targets(targets)
                    elif isinstance(key, str):
                        for name in _names(key):
                            by_name.setdefault(name, []).append(len(keyed))
                        keyed.append(tuple(_entry_targets(targets)))
        return cls(tuple(keyed), {k: tuple(v) for k, v in by_name.items()}, tuple(everyone))

    def targets(self, group: str) -> list[str]:
        """The targets of every key matching `group`, each key once, then those of every group."""
        matched = sorted({i for name in _names(group) for i in self.by_name.get(name, ())})
        return [t for i in matched for t in self.keyed[i]] + list(self.everyone)


def _fallback_targets(group: str, entries: Any) -> list[str]:
    """Groups a fallback list names for `group`: `[{"gpt-4o": ["o1"]}]` (router and request form; the generic
    `"*"` entry, which `default_fallbacks` becomes, for every group), or a request's own `["o1", {"model": "o3"}]`."""
    return _FallbackIndex.of(entries).targets(group)


def fallback_groups(group: str, data: Mapping[str, Any], router: Any) -> list[str]:
    """The group and every group LiteLLM may fall back to for this request: the request's own fallbacks and
    the router's (fallbacks, context-window and content-policy fallbacks, `"*"` / default fallbacks), followed
    from every group reached, since LiteLLM falls back from a fallback too. Linear in the lists and the groups
    reached."""
    requested: list[str] = []
    for key in _FALLBACK_KEYS:
        entries = data.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise RequestInvalid(f"{key} must be a list")
        for entry in entries:
            if isinstance(entry, Mapping):
                _overrides(f"an entry of {key}", entry, allowed=frozenset({"model"}))
                for targets in entry.values():  # router form, {"group": [{"model": ..., <params>}]}
                    for t in targets if isinstance(targets, list) else [targets]:
                        if isinstance(t, Mapping):
                            _overrides(f"a target in {key}", t, allowed=frozenset({"model"}))
        requested += [g for g in _fallback_targets(group, entries) if g not in requested]
    if len(requested) > _MAX_REQUEST_FALLBACKS:
        raise RequestInvalid(f"{len(requested)} fallback models in one request; the plugin prices up to 16")
    sources = [s for key in _FALLBACK_KEYS if (s := getattr(router, key, None))] if router is not None else []
    indexes = [_FallbackIndex.of(s) for s in sources]
    # a key's or team's router_settings: the proxy moves their fallbacks into the call after this hook
    override = data.get("router_settings_override")
    if isinstance(override, Mapping):
        indexes += [_FallbackIndex.of(s) for key in _FALLBACK_KEYS if (s := override.get(key))]
    groups = [group, *(g for g in requested if g != group)]
    seen = set(groups)
    for g in groups:  # grows while it runs: the router's fallbacks of every group reached
        for index in indexes:
            for t in index.targets(g):
                if t not in seen:
                    seen.add(t)
                    groups.append(t)
    return groups


def _deployments(group: str, router: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """(provider model, litellm_params) of every deployment of `group`."""
    if router is None:
        return [(group, {})]
    out: list[tuple[str, Mapping[str, Any]]] = []
    for dep in router.get_model_list(model_name=group) or []:
        params = dep.get("litellm_params", {})
        out.append((params.get("model", group), params))
    return out or [(group, {})]


def moderation_is_free(group: str, settings: Settings, router: Any = None) -> bool:
    """Moderation bills nothing at OpenAI; a group with any deployment elsewhere (Mistral bills its moderation,
    though LiteLLM's map prices it at 0) is free only when cycles.yaml's `free_models` says so."""
    if group in settings.free_models:
        return True
    for model, params in _deployments(group, router):
        try:
            provider = litellm.get_llm_provider(model, custom_llm_provider=params.get("custom_llm_provider"))[1]
        except Exception:  # noqa: BLE001 - a name LiteLLM cannot place: its moderation call goes to OpenAI
            provider = "openai"
        if provider != "openai":
            return False
    return True


_PRICE_TTL_S = 60.0  # deployments can change at runtime (proxy admin API): re-read them every minute
_price_cache: dict[tuple[str, int, int], tuple[float, tuple[tuple[str, Price], ...] | PriceUnknown]] = {}


def prices_of_group(group: str, settings: Settings, router: Any = None) -> tuple[tuple[str, Price], ...]:
    """Every deployment of the group with its price; PriceUnknown if any is unpriced. Cached for a minute per
    (group, settings, router): pricing sits on every request's path."""
    key = (group, id(settings), id(router))
    hit = _price_cache.get(key)
    now = time.monotonic()
    if hit is None or now - hit[0] > _PRICE_TTL_S:
        try:
            value: tuple[tuple[str, Price], ...] | PriceUnknown = _prices_of_group(group, settings, router)
        except PriceUnknown as exc:
            value = exc
        if len(_price_cache) > 4096:
            _price_cache.clear()
        hit = _price_cache[key] = (now, value)
    if isinstance(hit[1], PriceUnknown):
        raise hit[1]
    return hit[1]


def price_of_group(group: str, settings: Settings, router: Any = None) -> tuple[str, Price]:
    """The dearest deployment of a group by output, then input price (what a settle without LiteLLM's cost
    falls back to); PriceUnknown if any is unpriced."""
    return max(
        prices_of_group(group, settings, router),
        key=lambda mp: (mp[1].output_per_million, mp[1].input_per_million, mp[1].per_image),
    )


def _prices_of_group(group: str, settings: Settings, router: Any = None) -> tuple[tuple[str, Price], ...]:
    if group in settings.free_models:
        return ((group, Price(0, 0)),)
    if group in settings.prices:
        p = settings.prices[group]
        inp, out = p.per_million()
        return ((group, Price(inp, out, p.max_output_tokens)),)
    priced: list[tuple[str, Price]] = []
    for model, params in _deployments(group, router):
        if model in settings.free_models:
            price: Price | None = Price(0, 0)
        elif model in settings.prices:
            mp = settings.prices[model]
            price = Price(*mp.per_million(), mp.max_output_tokens)
        else:
            price = _litellm_price(model, params)
        if price is None:
            raise PriceUnknown(f"no price for {model} (model group {group}); price it in cycles.yaml or mark it free")
        priced.append((model, price))
    return tuple(priced)


class _TextCounts:
    """Token counts of recently seen texts: a system prompt, tool definitions and the earlier turns of a
    conversation come back on every request, and counting is the costly part of an estimate. Bounded
    by entries and by characters held; safe across threads."""

    def __init__(self, max_entries: int = 8192, max_chars: int = 4_000_000) -> None:
        self._counts: collections.OrderedDict[tuple[int, str], int] = collections.OrderedDict()
        self._chars = 0
        self._max_entries = max_entries
        self._max_chars = max_chars
        self._lock = threading.Lock()

    def count(self, setup: int, count: Callable[[str], int], text: str) -> int:
        key = (setup, text)
        with self._lock:
            n = self._counts.get(key)
            if n is not None:
                self._counts.move_to_end(key)
                return n
        n = count(text)
        if len(text) <= self._max_chars // 64:  # one huge text must not flush everything else
            with self._lock:
                if key not in self._counts:
                    self._counts[key] = n
                    self._chars += len(text)
                    while len(self._counts) > self._max_entries or self._chars > self._max_chars:
                        (_, old), _ = self._counts.popitem(last=False)
                        self._chars -= len(old)
        return n


_text_counts = _TextCounts()
_setup_ids = itertools.count()
_counter_cache: dict[str, tuple[float, Any]] = {}


def _count_setup(model: str) -> Any:
    """What `litellm.token_counter` sets up for `model` on every call before it counts (tokenizer choice,
    per-message overheads: more work than counting a short prompt), kept for a minute like prices; its
    count function remembers the counts of recent texts."""
    hit = _counter_cache.get(model)
    now = time.monotonic()
    if hit is None or now - hit[0] > _PRICE_TTL_S:
        if len(_counter_cache) > 4096:
            _counter_cache.clear()
        params = _MessageCountParams(model, None)
        params.count_function = functools.partial(_text_counts.count, next(_setup_ids), params.count_function)
        hit = _counter_cache[model] = (now, params)
    return hit[1]


def _message_tokens(model: str, messages: Any) -> int:
    """`litellm.token_counter(model=, messages=)` made of its own parts with the set-up cached. Image URLs
    are never fetched (a client's URL is untrusted input): images count at LiteLLM's default size."""
    if not _FAST_COUNT or litellm.disable_token_counter:
        return int(litellm.token_counter(model=model, messages=messages, use_default_image_token_count=True))
    params = _count_setup(model)
    msgs: Any = convert_list_message_to_dict(messages)
    tokens = _count_messages(params, msgs, True, None)
    system = any(isinstance(m, Mapping) and m.get("role", None) == "system" for m in msgs)
    return int(tokens + _count_extra(params.count_function, None, None, system))


def _text_tokens(model: str, text: str) -> int:
    """Exactly `litellm.token_counter(model=, text=)`, with the set-up cached."""
    if not _FAST_COUNT or litellm.disable_token_counter:
        return int(litellm.token_counter(model=model, text=text))
    return int(_count_setup(model).count_function(text))


# Per message or input item, as OpenAI's own counting recipe adds (role, separators), and the reply's
# priming; an image block counts as this many tokens (about the largest a provider bills for one image).
_PER_ITEM_TOKENS = 4
_PRIMING_TOKENS = 3
IMAGE_TOKENS = 1_600
# Models whose provider bills an image at more than IMAGE_TOKENS, at their most (a high-detail image of 8 tiles
# or 1,536 patches). LiteLLM's counter prices every OpenAI image with gpt-4o's rule (85 + 170 a tile), but
# OpenAI bills gpt-4o-mini 2,833 + 5,667 a tile, and the patch models 1,536 patches times a multiplier
# (https://platform.openai.com/docs/guides/images-vision, "Calculating costs").
_IMAGE_TOKENS_AT_MOST = {
    "gpt-4o-mini": 2_833 + 8 * 5_667,
    "gpt-4.1-mini": 2_489,
    "gpt-4.1-nano": 3_779,
    "o4-mini": 2_642,
    "gpt-5-mini": 2_489,
    "gpt-5-nano": 3_779,
}


@functools.lru_cache(maxsize=1024)
def image_tokens(model: str) -> int:
    """The most input tokens one image may bill on `model`."""
    return max([IMAGE_TOKENS, *(n for name, n in _IMAGE_TOKENS_AT_MOST.items() if name in model)])


_SKIP_KEYS = frozenset({"type", "role", "cache_control", "id", "call_id", "status", "tool_use_id", "detail"})
_IMAGE_TYPES = frozenset({"image", "image_url", "input_image", "image_file"})
_FILE_TYPES = frozenset({"file", "input_file", "document", "input_audio", "audio"})
_FILE_BYTES_PER_UNIT = 100_000  # a file or document block: one image's worth of tokens per 100 kB of it
# Content a request only points at (a file by id or URL, a video, a stored item or response, a cached context):
# the provider bills all of it, the plugin cannot size it, so it counts as the model's whole input window
# (`_UNSIZED_TOKENS`, cut to that window in `estimate_call`; refused when the window is unknown).
_UNSIZED_TOKENS = 2**40
_REFERENCE_KEYS = frozenset({"file_id", "file_url", "url", "uri", "file_uri"})
_VIDEO_TYPES = frozenset({"video", "video_url", "input_video"})
_SMALLEST_WINDOW = 2_048  # no priced model takes less input than this


def _points_elsewhere(value: Any, depth: int = 0) -> bool:
    """True when a file block names its content by id or URL instead of carrying it."""
    if depth > 8:
        return True
    if isinstance(value, dict):
        return any(k in _REFERENCE_KEYS or _points_elsewhere(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return any(_points_elsewhere(v, depth + 1) for v in value)
    return False


def _media_units(block: Mapping[str, Any]) -> int:
    """Images in one content block (1), or a file / document / audio block sized in image-equivalents; 0
    for anything else. A provider bills these by their content, which the plugin does not decode."""
    kind = block.get("type")
    if kind in _IMAGE_TYPES:
        return 1
    if kind in _FILE_TYPES:
        if _points_elsewhere(block):
            return -(-_UNSIZED_TOKENS // IMAGE_TOKENS)
        return max(1, -(-len(_json_text(block)) // _FILE_BYTES_PER_UNIT))
    if kind in _VIDEO_TYPES or kind == "item_reference":
        return -(-_UNSIZED_TOKENS // IMAGE_TOKENS)
    return 0


def _media_tokens(value: Any, per_image: int, depth: int = 0) -> int:
    """`per_image` tokens for every image-equivalent inside a request field (see _media_units)."""
    if depth > 32:
        return 0
    if isinstance(value, dict):  # parsed JSON: concrete types (an ABC check costs more than the scan)
        units = _media_units(value)
        if units:
            return per_image * units
        return sum(_media_tokens(v, per_image, depth + 1) for v in value.values() if isinstance(v, dict | list))
    if isinstance(value, list):
        return sum(_media_tokens(v, per_image, depth + 1) for v in value if isinstance(v, dict | list))
    return 0


_JSON_KEYS = frozenset({"input", "arguments", "parameters", "input_schema"})
_PER_TOOL_TOKENS = 2  # slack per tool definition: the provider may render the same JSON in another key order


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)
    except RecursionError:
        raise RequestInvalid("the request nests too deeply to be counted") from None


def _billable_texts(value: Any, images: list[int], depth: int = 0) -> Iterable[str]:
    """Every text a provider could bill inside a request field, whatever its shape (strings, content
    blocks, Anthropic or Responses items): unknown shapes are counted, never skipped. Image blocks are
    tallied in `images` instead of counting their base64 data as text."""
    if depth > 32:  # a hostile nesting depth: count what we have, do not recurse further
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        units = _media_units(value)
        if units:
            images[0] += units
            return
        for key, item in value.items():
            if key in _JSON_KEYS and not isinstance(item, str):
                yield _json_text(item)  # a tool call's arguments are billed as the JSON the model wrote
            elif key not in _SKIP_KEYS:
                yield from _billable_texts(item, images, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _billable_texts(item, images, depth + 1)
    elif value is not None and not isinstance(value, bool):
        yield str(value)


def _walk_tokens(model: str, *fields: Any) -> int:
    """Tokens of every billable text in `fields`, plus per-item overheads and images."""
    images = [0]
    tokens = _PRIMING_TOKENS
    for field in fields:
        items = field if isinstance(field, list) else [field]
        tokens += _PER_ITEM_TOKENS * sum(1 for item in items if item is not None)
        tokens += sum(_text_tokens(model, text) for text in _billable_texts(field, images) if text)
    return tokens + image_tokens(model) * images[0]


def _json_tokens(model: str, value: Any) -> int:
    """Tool definitions are counted as the JSON the client sent: never fewer tokens than the provider's
    own rendering of them."""
    if not value:
        return 0
    slack = _PER_TOOL_TOKENS * (len(value) if isinstance(value, list) else 1)
    return _text_tokens(model, _json_text(value)) + slack


def _chat_tokens(model: str, data: Mapping[str, Any]) -> int:
    messages = data.get("messages")
    try:
        tokens = _message_tokens(model, messages) if isinstance(messages, list) else _walk_tokens(model, messages)
        # LiteLLM's counter takes an image at its default size (and a file at nearly nothing): pay for
        # every image and file at the plugin's worst case on top of that.
        if isinstance(messages, list) and any(
            isinstance(m, dict) and not isinstance(m.get("content"), str | None) for m in messages
        ):
            tokens += _media_tokens(messages, image_tokens(model))
    except Exception:  # noqa: BLE001 - a shape LiteLLM's counter rejects is still counted, by walking it
        tokens = _walk_tokens(model, messages)
    return tokens + _json_tokens(model, data.get("tools")) + _json_tokens(model, data.get("functions"))


def _prompts(value: Any) -> list[Any]:
    """A text completion's prompts: a string, a list of strings, a token list or a list of token lists."""
    if isinstance(value, list) and value and not all(isinstance(v, int) for v in value):
        return value
    return [value]


def _prompt_tokens(model: str, prompt: Any) -> int:
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    return sum(_text_tokens(model, t) for t in _billable_texts(prompt, [0]) if t)


def _positive_int(value: Any) -> int | None:
    """A positive whole number however the client wrote it (5, 5.0, "5", 4.2 -> 5), else None: providers and
    LiteLLM accept such forms for counts, so the estimate must too."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = math.ceil(value)
    return value if isinstance(value, int) and value > 0 else None


def _count_param(value: Any) -> int:
    """`n` / `best_of`: how many answers, at least one."""
    return _positive_int(value) or 1


_MAX_OUTPUTS = 1_000  # answers per request (OpenAI's n is at most 128): beyond, the request is refused


# The request field that carries the output cap, per kind (the first present wins).
CAP_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "text": ("max_tokens",),
    "messages": ("max_tokens",),
    "responses": ("max_output_tokens",),
}
_DEFAULT_OUTPUT_CAP = 4096
# The smallest cap a route accepts: the Responses API raises a smaller max_output_tokens to 16, so a
# clamp below it would let the provider write (and bill) more than the hold pays for.
MIN_CAP: dict[str, int] = {"max_output_tokens": 16}


def output_cap(data: Mapping[str, Any], price: Price, kind: str = "chat") -> int:
    """The most output tokens one answer may have: the cap the request names (never below the route's floor,
    which LiteLLM raises it to), never above the model's own maximum; the model's maximum when the request
    names none (4,096 when even that is unknown: the plugin then writes that cap into the request)."""
    field = cap_field(data, kind)
    # Both max_tokens and max_completion_tokens may come (LiteLLM forwards both to some providers): the
    # larger one is what a provider may honour.
    named = [v for f in CAP_FIELDS.get(kind, ()) if (v := _positive_int(data.get(f))) is not None]
    requested = max(named) if named else None
    ceiling = price.max_output_tokens
    if requested is None:
        return ceiling or _DEFAULT_OUTPUT_CAP
    requested = max(requested, MIN_CAP.get(field or "", 1))
    return min(requested, ceiling) if ceiling else requested


def cap_to_send(data: Mapping[str, Any], est: Estimate) -> int | None:
    """The cap to write into the request so the provider cannot write more than the hold pays for, or None
    when the request already bounds it: its own cap is above the model's maximum (or unknown, and absent)."""
    if est.cap_field is None or not est.output_cap:
        return None
    named = [v for f in CAP_FIELDS.get(est.kind, ()) if (v := _positive_int(data.get(f))) is not None]
    requested = max(named) if named else None
    if requested is None:
        return est.output_cap if est.output_cap == _DEFAULT_OUTPUT_CAP else None
    return est.output_cap if requested > est.output_cap else None


def set_cap(data: dict[str, Any], est: Estimate, value: int) -> None:
    """Write a cap into every cap field of the route the request names (the route's first when none), so no
    other field lets the provider write more."""
    fields = [f for f in CAP_FIELDS.get(est.kind, ()) if data.get(f) is not None]
    for f in fields or ([est.cap_field] if est.cap_field else []):
        data[f] = value


def cap_field(data: Mapping[str, Any], kind: str) -> str | None:
    """Where a clamp goes for this kind of request: the cap field the client used, else the route's first."""
    fields = CAP_FIELDS.get(kind, ())
    return next((f for f in fields if data.get(f) is not None), fields[0] if fields else None)


def estimate_call(group: str, data: Mapping[str, Any], kind: str, settings: Settings, router: Any = None) -> Estimate:
    """Worst case of one request of a metered `kind` (see routes.py) in USD_MICROCENTS: every billed input
    x input price + every possible output x output price, at whichever deployment of the group or of a
    group it may fall back to costs most for this request."""
    _overrides("extra_body", data.get("extra_body"))
    groups = fallback_groups(group, data, router)
    if kind in ("image", "speech", "transcription", "rerank"):
        return max((_unit_priced(g, data, kind, settings, router) for g in groups), key=lambda e: e.amount)
    # one estimate per distinct (model, price): a large router repeats a few models under many groups
    candidates = dict.fromkeys(mp for g in groups for mp in prices_of_group(g, settings, router))
    # a provider-side cache (Gemini) and what server tools fetch are billed, and not in the body
    tools = server_tools(data, kind) if kind in ("chat", "messages", "responses") else _NO_SERVER_TOOLS
    cached = bool(data.get("cached_content")) or tools.server
    tokens_by_model: dict[str, int] = {}
    best: Estimate | None = None
    for priced, price in candidates:
        # Count with the tokenizer LiteLLM picks for the name the provider sees (`claude-haiku-4-5`, not
        # `anthropic/claude-haiku-4-5`, which falls back to a generic encoding that counts fewer tokens).
        model = counting_model(priced)
        if model not in tokens_by_model:
            tokens_by_model[model] = _input_tokens(model, data, kind) + (_UNSIZED_TOKENS if cached else 0)
        est = _token_estimate(priced, price, _within_window(priced, tokens_by_model[model]), data, kind)
        if tools.searches or tools.grounded or tools.maps:  # (the usual call: no lookup)
            if _is_gemini(priced):  # every web search form reaches Gemini as its grounding (max_uses dropped)
                grounded = tools.grounded or tools.searches > 0
                fee = _grounding_fee(priced, grounded, tools.maps, est.outputs) if grounded or tools.maps else 0
            else:
                fee = tools.searches * _search_fee(priced)
            est = _with_fee(est, fee) if fee else est
        if best is None or est.amount > best.amount:
            best = est
    assert best is not None
    return best


# Tools the provider runs itself: what they fetch or compute is billed as input (the call holds the model's input
# window, like content it only points at), and a web search also bills a fee per search
# (`search_context_cost_per_query` in LiteLLM's map, at its dearest context size).
_SERVER_TOOL_TYPES = ("web_search", "web_fetch", "code_execution", "file_search", "code_interpreter", "mcp")
# Gemini's own tools are keyed by name, not typed (LiteLLM's `search_tool_keys`). A search one grounds the answer
# in Google Search, and Google Maps grounds it in Maps: LiteLLM bills either per grounded prompt (Gemini 2.x) or
# per query (3.x, `web_search_billing_unit: per_query` in its map), at the map's price or Google's list price.
_GEMINI_SEARCH_TOOLS = frozenset(
    {
        "googleSearch", "google_search", "googleSearchRetrieval", "google_search_retrieval", "enterpriseWebSearch",
        "enterprise_web_search", "url_context", "urlContext",
    }
)  # fmt: skip
_GEMINI_MAPS_TOOLS = frozenset({"googleMaps", "google_maps"})
_GEMINI_SERVER_TOOLS = _GEMINI_SEARCH_TOOLS | _GEMINI_MAPS_TOOLS | {"code_execution", "codeExecution", "computerUse"}
_GROUNDING_SEARCH_USD = Decimal("0.035")  # LiteLLM's default per grounded prompt (or per query)
_GROUNDING_MAPS_USD = {"per_prompt": Decimal("0.025"), "per_query": Decimal("0.014")}
# Gemini 3 runs as many search queries for one grounded prompt as it chooses, and a request cannot bound them:
# held at this many (the one provider-side count the plugin has to assume; the commit charges what ran).
GROUNDING_QUERIES_HELD = 10


@dataclass(frozen=True)
class ServerTools:
    """What a request's provider-run tools may bill beyond its tokens."""

    server: bool = False  # the provider runs tools itself: what they fetch is billed as input
    searches: int = 0  # web searches billed per search (OpenAI, Anthropic; on Gemini: its grounding)
    grounded: bool = False  # Gemini grounding with Google Search
    maps: bool = False  # Gemini grounding with Google Maps


_NO_SERVER_TOOLS = ServerTools()
# Grounding with Google Search or Maps: LiteLLM bills its fee and not what the search retrieved (it leaves Gemini's
# tool-use prompt tokens out then), so these alone do not hold the input window; url_context does (its pages are
# billed as input), as do code execution and computer use.
_GROUNDING_ONLY = frozenset(_GEMINI_SEARCH_TOOLS - {"url_context", "urlContext"}) | _GEMINI_MAPS_TOOLS


def _is_web_search(tool: Mapping[str, Any], kind: str) -> bool:
    """A web search tool as LiteLLM tells one: typed `web_search…` (OpenAI, Anthropic), or on /v1/messages
    Anthropic's legacy form, named `web_search` without an input schema."""
    if str(tool.get("type") or "").startswith("web_search"):
        return True
    return kind == "messages" and tool.get("name") == "web_search" and "input_schema" not in tool


def server_tools(data: Mapping[str, Any], kind: str = "chat") -> ServerTools:
    """The provider-run tools of a request (in `tools`, or the older `functions`, which LiteLLM maps the same way)
    and how many web searches it may bill. A web search tool must be bounded: `max_uses` on the tool (Anthropic),
    `max_tool_calls` (/v1/responses); chat's `web_search_options` is one search a request (on Gemini, every form
    is its grounding). An unbounded one is refused: its fees could not be held."""
    if not (data.get("tools") or data.get("functions") or data.get("mcp_servers")) and (
        data.get("web_search_options") is None
    ):
        return _NO_SERVER_TOOLS  # the usual call
    listed = [
        t for key in ("tools", "functions") if isinstance(v := data.get(key), list) for t in v if isinstance(t, dict)
    ]
    kinds = [str(t.get("type") or "") for t in listed]
    named = {k for t in listed for k in t if isinstance(k, str)}
    grounded = bool(named & _GEMINI_SEARCH_TOOLS)
    maps = bool(named & _GEMINI_MAPS_TOOLS)
    server = (
        any(k.startswith(_SERVER_TOOL_TYPES) for k in kinds)
        or bool(named & (_GEMINI_SERVER_TOOLS - _GROUNDING_ONLY))
        or bool(data.get("mcp_servers"))
    )
    searches = 1 if data.get("web_search_options") is not None else 0
    # only /v1/responses has max_tool_calls: elsewhere a provider may ignore it, so it bounds nothing
    bound = _positive_int(data.get("max_tool_calls")) if kind == "responses" else None
    for tool in listed:
        if _is_web_search(tool, kind):
            uses = _positive_int(tool.get("max_uses")) or bound
            if uses is None:
                raise RequestInvalid(
                    "a web search tool without max_uses (max_tool_calls on /v1/responses) may search without "
                    "limit, and each search is billed: name how many it may make"
                )
            searches += uses
    searches = min(searches, bound) if bound and searches else searches
    return ServerTools(server or searches > 0, searches, grounded, maps)


def _is_gemini(priced: str) -> bool:
    """A model LiteLLM prices grounding on: Gemini at Google AI Studio or Vertex (Claude on Vertex is Anthropic's)."""
    provider = str(model_info(priced).get("litellm_provider") or priced.partition("/")[0])
    return (provider == "gemini" or provider.startswith("vertex_ai")) and "claude" not in priced.lower()


def _grounding_fee(priced: str, search: bool, maps: bool, answers: int = 1) -> int:
    """USD_MICROCENTS of Gemini's grounding on `priced`: one fee per grounded prompt, or per query where the map
    bills per query (LiteLLM: any unit but `per_prompt`), held at GROUNDING_QUERIES_HELD for each of the
    `answers` the request asks for (each candidate may search on its own)."""
    info = model_info(priced)
    per_query = (info.get("web_search_billing_unit") or "per_prompt") != "per_prompt"
    times = GROUNDING_QUERIES_HELD * answers if per_query else 1
    usd = Decimal(0)
    if search:
        fees = info.get("search_context_cost_per_query")
        medium = fees.get("search_context_size_medium") if isinstance(fees, Mapping) else None
        usd += times * (Decimal(str(medium)) if isinstance(medium, int | float) else _GROUNDING_SEARCH_USD)
    if maps:
        configured = info.get("google_maps_grounding_cost_per_query")
        each = configured if isinstance(configured, int | float) else None
        usd += times * (
            Decimal(str(each)) if each is not None else _GROUNDING_MAPS_USD["per_query" if per_query else "per_prompt"]
        )
    return math.ceil(usd * _MICROCENTS_PER_USD)


def _search_fee(priced: str) -> int:
    """USD_MICROCENTS per web search on `priced`, at its dearest search context size (0 when unpriced)."""
    fees = model_info(priced).get("search_context_cost_per_query")
    values = [v for v in fees.values() if isinstance(v, int | float)] if isinstance(fees, Mapping) else []
    return math.ceil(Decimal(str(max(values))) * _MICROCENTS_PER_USD) if values else 0


def _within_window(priced: str, tokens: int) -> int:
    """No provider bills more input than its model takes: a count above the window is cut to it. Content the
    plugin could not size (`_UNSIZED_TOKENS`) needs that window, or the request is refused."""
    if tokens <= _SMALLEST_WINDOW:  # the usual call: no lookup
        return tokens
    info = model_info(priced)
    window = _positive_int(info.get("max_input_tokens"))  # (`max_tokens` in LiteLLM's map is the output's)
    if window is not None and tokens > window:
        return window
    if tokens >= _UNSIZED_TOKENS:
        raise RequestInvalid(
            "this request points at content the plugin cannot size (a file by id or URL, a video, a stored "
            f"response or cache), and {priced}'s input window is unknown: send the content, or price the model"
        )
    return tokens


def _with_fee(est: Estimate, fee: int) -> Estimate:
    """`est` plus a fee the call bills whatever it writes (held with the input: a soft landing cannot cut it)."""
    return dataclasses.replace(est, amount=est.amount + fee, input_cost=est.input_cost + fee)


def _input_tokens(model: str, data: Mapping[str, Any], kind: str) -> int:
    try:
        if kind == "chat":
            return _chat_tokens(model, data) + _json_tokens(model, data.get("response_format"))
        if kind == "text":
            prompts = _prompts(data.get("prompt", ""))
            return sum(_prompt_tokens(model, p) for p in prompts) + _prompt_tokens(model, data.get("suffix") or "")
        if kind == "messages":
            tokens = _walk_tokens(model, data.get("system"), data.get("messages"))
            tokens += _json_tokens(model, data.get("tools")) + _json_tokens(model, data.get("output_format"))
            return tokens + (_tool_prompt_tokens(model) if data.get("tools") else 0)
        if kind == "responses":
            tokens = _walk_tokens(model, data.get("instructions"), data.get("input"))
            # a stored conversation or response, or a stored prompt, is billed in full: not in this body
            if data.get("previous_response_id") or data.get("conversation") or isinstance(data.get("prompt"), dict):
                tokens += _UNSIZED_TOKENS
            return tokens + _json_tokens(model, data.get("tools")) + _json_tokens(model, data.get("text"))
        if kind == "embedding":
            return sum(_prompt_tokens(model, i) for i in _prompts(data.get("input", "")))
    except RecursionError:
        raise RequestInvalid("the request nests too deeply to be counted") from None
    raise PriceUnknown(f"no estimator for {kind} calls")


def _token_estimate(priced: str, price: Price, tokens: int, data: Mapping[str, Any], kind: str) -> Estimate:
    in_rate, out_rate = _request_rates(priced, price, tokens, data)
    input_cost = _tokens_cost(tokens, in_rate)
    if kind == "embedding":
        return Estimate(input_cost, input_cost, 0, 0, tokens, priced)
    outputs = 1
    if kind == "chat":
        outputs = _count_param(data.get("n"))
    elif kind == "text":
        outputs = len(_prompts(data.get("prompt", ""))) * max(
            _count_param(data.get("n")), _count_param(data.get("best_of"))
        )
    if outputs > _MAX_OUTPUTS:
        raise RequestInvalid(f"{outputs} answers in one request is more than the {_MAX_OUTPUTS} the plugin will hold")
    cap = output_cap(data, price, kind)
    amount = input_cost + _tokens_cost(cap * outputs, out_rate)
    if amount >= 2**53:
        raise RequestInvalid("the worst case of this request is beyond what the ledger holds")
    return Estimate(amount, input_cost, out_rate, cap, tokens, priced, outputs, cap_field(data, kind), kind)


_THRESHOLDS_K = (100, 128, 200, 272, 512)  # LiteLLM's long-context price tiers, in thousands of input tokens
_STANDARD_TIERS = frozenset({"auto", "default", "standard"})
_rates_cache: dict[str, tuple[float, _Rates]] = {}


@dataclass(frozen=True, slots=True)
class _Rates:
    all: dict[str, int]  # every per-token cost in LiteLLM's map for the model, USD_MICROCENTS per million
    reasoning_out: int  # output_cost_per_reasoning_token (a floor for the output rate)
    tiered: bool  # any service-tier, long-context, cache-write or audio-output rate at all
    cache_writes: bool


def _rates(model: str) -> _Rates:
    """Every per-token rate LiteLLM's map has for a model (service tiers, long-context tiers, audio, cache
    writes, reasoning); cached like prices."""
    hit = _rates_cache.get(model)
    now = time.monotonic()
    if hit is None or now - hit[0] > _PRICE_TTL_S:
        info = model_info(model)
        rates = {k: _per_million(v) for k, v in info.items() if isinstance(v, int | float) and "cost" in k and v}
        tiered = any(  # rates a request can select by its size, caching or audio (service tiers: by name)
            "_above_" in k or k.startswith("cache_creation_input_token_cost") or k == "output_cost_per_audio_token"
            for k in rates
        )
        value = _Rates(
            rates, rates.get("output_cost_per_reasoning_token", 0), tiered, "cache_creation_input_token_cost" in rates
        )
        if len(_rates_cache) > 4096:
            _rates_cache.clear()
        hit = _rates_cache[model] = (now, value)
    return hit[1]


def _request_rates(model: str, price: Price, tokens: int, data: Mapping[str, Any]) -> tuple[int, int]:
    """The input and output rates this request can be billed at, never below the base price: the service
    tier it asks for, the long-context tier its input reaches, audio output, cache writes, reasoning."""
    inp, out = price.input_per_million, price.output_per_million
    if inp == 0 and out == 0:  # free
        return inp, out
    table = _rates(model)
    out = max(out, table.reasoning_out)
    tier = data.get("service_tier")
    if not table.tiered and not tier:
        return inp, out
    rates = table.all
    suffixes = [""]
    if isinstance(tier, str) and tier not in _STANDARD_TIERS:
        suffixes.append("_" + tier)
    levels = [""] + [f"_above_{k}k_tokens" for k in _THRESHOLDS_K if tokens > k * 1000]
    ttls: set[str] = set()
    if table.cache_writes:
        for f in ("system", "messages", "tools", "input"):
            _cache_ttls(data.get(f), ttls)
    for level in levels:
        for suffix in suffixes:
            inp = max(inp, rates.get(f"input_cost_per_token{level}{suffix}", 0))
            out = max(out, rates.get(f"output_cost_per_token{level}{suffix}", 0))
            if ttls:  # a cache write bills the prompt above the input rate (1.25x; 2x for an hour's TTL)
                inp = max(inp, rates.get(f"cache_creation_input_token_cost{level}{suffix}", 0))
                if "1h" in ttls:
                    inp = max(inp, rates.get("cache_creation_input_token_cost_above_1hr", 0))
    modalities = data.get("modalities")
    if data.get("audio") or (isinstance(modalities, list) and "audio" in modalities):
        out = max(out, rates.get("output_cost_per_audio_token", 0))
    return inp, out


def _cache_ttls(value: Any, found: set[str], depth: int = 0) -> None:
    """The TTLs of the cache_control markers inside `value` ("5m" when a marker names none)."""
    if depth > 32:
        return
    if isinstance(value, dict):
        marker = value.get("cache_control")
        if isinstance(marker, dict):
            found.add(str(marker.get("ttl") or "5m"))
        for v in value.values():
            if isinstance(v, dict | list):
                _cache_ttls(v, found, depth + 1)
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, dict | list):
                _cache_ttls(v, found, depth + 1)


def counting_model(model: str) -> str:
    """The model name to count tokens for: the one the provider sees."""
    _, sep, name = model.partition("/")
    return name if sep and name else model


def _tool_prompt_tokens(model: str) -> int:
    """The system prompt a provider adds when tools are given (Anthropic's tool-use prompt), from LiteLLM's map."""
    return int(model_info(model).get("tool_use_system_prompt_tokens") or 0)


def _model_info(model: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
    info = model_info(model)
    overrides = {k: v for k, v in params.items() if isinstance(k, str) and "cost" in k and v is not None}
    return {**info, **overrides}


def _usd(value: Any) -> int:
    return math.ceil(Decimal(str(value)) * _MICROCENTS_PER_USD) if value else 0


_IMAGE_SIZES = ("1024x1024", "1024x1536", "1536x1024", "1792x1024", "1024x1792")
_IMAGE_QUALITIES = ("high", "hd", "standard", "medium", "low")


def _image_cost(model: str, info: Mapping[str, Any], data: Mapping[str, Any]) -> int:
    """n images at the request's size and quality, the dearest LiteLLM knows when either is absent or 'auto'."""
    from litellm.cost_calculator import default_image_cost_calculator

    n = _positive_int(data.get("n")) or 1
    size, quality = data.get("size"), data.get("quality")
    sizes = (size,) if isinstance(size, str) and size != "auto" else _IMAGE_SIZES
    qualities: tuple[str | None, ...] = (
        (quality,) if isinstance(quality, str) and quality != "auto" else (*_IMAGE_QUALITIES, None)
    )
    provider, _, bare = model.rpartition("/")
    best = 0
    for s in sizes:
        for q in qualities:
            try:
                usd = default_image_cost_calculator(bare, provider or None, q, n, s)
            except Exception:  # noqa: BLE001 - this size/quality is not in LiteLLM's map
                continue
            best = max(best, _usd(usd))
    if not best and info.get("output_cost_per_image"):
        best = n * _usd(info["output_cost_per_image"])
    if not best:
        raise PriceUnknown(f"no price per image for {model} at size {size!r}, quality {quality!r}")
    return best


def _audio_seconds(file: Any) -> float:
    """Length of an uploaded audio file: WAV read here, other formats through LiteLLM (needs soundfile)."""
    import io
    import wave

    try:
        if hasattr(file, "seek"):
            file.seek(0)
        stream = file if hasattr(file, "read") else io.BytesIO(bytes(file))
        with wave.open(stream, "rb") as w:
            byte_rate = w.getframerate() * w.getnchannels() * w.getsampwidth()
            seconds = w.getnframes() / float(w.getframerate())
        # The header names the first data chunk only; a file may hold more (players read them all). Every
        # byte of the file as audio is never less than what is there.
        stream.seek(0, io.SEEK_END)
        seconds = max(seconds, max(0, stream.tell() - 44) / byte_rate if byte_rate else 0.0)
    except Exception:  # noqa: BLE001 - not a WAV file: ask LiteLLM
        from litellm.litellm_core_utils.audio_utils.utils import calculate_request_duration

        seconds = calculate_request_duration(file) or 0.0
        if not seconds:
            raise PriceUnknown("cannot read the audio file's duration (send WAV, or install soundfile)") from None
    finally:
        if hasattr(file, "seek"):
            file.seek(0)
    return seconds


def _rerank_units(model: str, data: Mapping[str, Any]) -> int:
    """Search units as Cohere bills them: one query over up to 100 documents, a document longer than 500
    tokens (with the query) counting once per 500."""
    query = _prompt_tokens(model, data.get("query", ""))
    docs = data.get("documents") or []
    chunks = sum(-(-(query + _prompt_tokens(model, d)) // 500) for d in (docs if isinstance(docs, list) else [docs]))
    return max(1, -(-chunks // 100))


def _unit_priced(group: str, data: Mapping[str, Any], kind: str, settings: Settings, router: Any) -> Estimate:
    """Images, speech, transcription and rerank: priced per image, character, second or query from LiteLLM's
    map (plus any per-token input price), the dearest deployment of the group."""
    if group in settings.free_models:
        return Estimate(0, 0, 0, 0, 0, group)
    best: Estimate | None = None
    for model, params in _deployments(group, router):
        if model in settings.free_models:
            est = Estimate(0, 0, 0, 0, 0, model)
        else:
            info = _model_info(model, params)
            tokens = 0
            if kind == "image":
                tokens = _prompt_tokens(model, data.get("prompt", ""))
                per_token = _per_million(info.get("input_cost_per_token"))
                amount = _image_cost(model, info, data) + _tokens_cost(tokens, per_token)
            elif kind == "speech":
                raw = data.get("input")
                text = raw if isinstance(raw, str) else str(raw or "")
                if info.get("input_cost_per_character") and not info.get("output_cost_per_second"):
                    amount = _usd(Decimal(str(info["input_cost_per_character"])) * len(text))
                else:
                    raise PriceUnknown(f"{model} bills audio output by length, which a request does not bound")
            elif kind == "transcription":
                per_second = info.get("input_cost_per_second")
                if not per_second:
                    raise PriceUnknown(f"no price per second for {model}")
                seconds = math.ceil(_audio_seconds(data.get("file")))
                amount = _usd(Decimal(str(per_second)) * seconds)
            else:  # rerank
                per_query = info.get("input_cost_per_query")
                if not per_query:
                    raise PriceUnknown(f"no price per query for {model}")
                amount = _usd(Decimal(str(per_query)) * _rerank_units(model, data))
            if amount <= 0:
                raise PriceUnknown(f"no price for {model} {kind} calls")
            est = Estimate(amount, amount, 0, 0, tokens, model)
        if best is None or est.amount > best.amount:
            best = est
    assert best is not None
    return best


_NOT_IN_TOKENS = frozenset({"image", "speech", "transcription", "rerank"})


def token_hold(est: Estimate, kind: str) -> int | None:
    """The most tokens the call can use (the prompt plus every answer at its cap), held on TOKENS budgets
    next to the dollars; None on routes that are not counted in tokens (`kind` is the route's kind)."""
    if kind in _NOT_IN_TOKENS:
        return None
    return est.input_tokens + est.output_cap * est.outputs


def cost_of_usage(prompt_tokens: int, completion_tokens: int, price: Price) -> int:
    """Exact integer cost of known usage at a price (used when LiteLLM reports no response_cost)."""
    return _tokens_cost(prompt_tokens, price.input_per_million) + _tokens_cost(
        completion_tokens, price.output_per_million
    )


def soft_landing(est: Estimate, min_output_tokens: int) -> SoftLanding | None:
    """Let a completion that does not fit run smaller: reserve what is left if it pays for the prompt
    plus `min_output_tokens` on every output, and cap the output tokens to what it pays for."""
    if not est.output_per_million or est.cap_field is None:
        return None
    per_million = est.output_per_million * est.outputs  # one token more of cap is one more on every output
    min_output_tokens = max(min_output_tokens, MIN_CAP.get(est.cap_field, 1))
    minimum = est.input_cost + _tokens_cost(min_output_tokens, per_million)
    return SoftLanding(
        min_amount=min(minimum, est.amount),
        fixed_amount=est.input_cost,
        amount_per_million_tokens=per_million,
    )
