"""Worst-case cost of a call, from LiteLLM's own prices and token counter, in USD_MICROCENTS.

LiteLLM keeps prices as float USD per token; they are turned into exact integers (microcents per
million tokens) once, here, and all arithmetic after that is on integers. A price of 0 or none is
*unknown*, not free: such calls are denied (PRICE_UNKNOWN) unless cycles.yaml prices the model or
lists it as free.
"""

from __future__ import annotations

import collections
import functools
import itertools
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

__all__ = ["Estimate", "Price", "PriceUnknown", "cost_of_usage", "estimate_call", "price_of_group", "soft_landing"]

_MICROCENTS_PER_USD = 10**8
_PER_MILLION = 10**6


class PriceUnknown(LookupError):
    """No trustworthy price for a model: the caller denies with reason PRICE_UNKNOWN."""


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


def _per_million(usd_per_token: Any) -> int:
    if not usd_per_token:
        return 0
    return math.ceil(Decimal(str(usd_per_token)) * _MICROCENTS_PER_USD * _PER_MILLION)


def _tokens_cost(tokens: int, per_million: int) -> int:
    return -(-tokens * per_million // _PER_MILLION)  # ceiling: an estimate never undershoots


def _litellm_price(model: str, params: Mapping[str, Any] | None = None) -> Price | None:
    params = params or {}
    inp, out = params.get("input_cost_per_token"), params.get("output_cost_per_token")
    info: Mapping[str, Any] = {}
    try:
        info = litellm.get_model_info(model)
    except Exception:  # noqa: BLE001 - LiteLLM raises several types for an unmapped model
        info = {}
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


def _deployments(group: str, router: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """(provider model, litellm_params) of every deployment of `group` and of its fallback groups."""
    if router is None:
        return [(group, {})]
    groups = [group]
    for entry in getattr(router, "fallbacks", None) or []:
        if isinstance(entry, Mapping) and group in entry:
            groups.extend(entry[group] if isinstance(entry[group], list) else [entry[group]])
    out: list[tuple[str, Mapping[str, Any]]] = []
    for g in groups:
        for dep in router.get_model_list(model_name=g) or []:
            params = dep.get("litellm_params", {})
            out.append((params.get("model", g), params))
    return out or [(group, {})]


_PRICE_TTL_S = 60.0  # deployments can change at runtime (proxy admin API): re-read them every minute
_price_cache: dict[tuple[str, int, int], tuple[float, tuple[str, Price] | PriceUnknown]] = {}


def price_of_group(group: str, settings: Settings, router: Any = None) -> tuple[str, Price]:
    """The dearest price over the group's deployments and fallbacks; PriceUnknown if any is unpriced.

    Cached for a minute per (group, settings, router): pricing sits on every request's path."""
    key = (group, id(settings), id(router))
    hit = _price_cache.get(key)
    now = time.monotonic()
    if hit is None or now - hit[0] > _PRICE_TTL_S:
        try:
            value: tuple[str, Price] | PriceUnknown = _price_of_group(group, settings, router)
        except PriceUnknown as exc:
            value = exc
        if len(_price_cache) > 4096:
            _price_cache.clear()
        hit = _price_cache[key] = (now, value)
    if isinstance(hit[1], PriceUnknown):
        raise hit[1]
    return hit[1]


def _price_of_group(group: str, settings: Settings, router: Any = None) -> tuple[str, Price]:
    if group in settings.free_models:
        return group, Price(0, 0)
    if group in settings.prices:
        p = settings.prices[group]
        inp, out = p.per_million()
        return group, Price(inp, out, p.max_output_tokens)
    best: tuple[str, Price] | None = None
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
        if best is None or (price.output_per_million, price.input_per_million, price.per_image) > (
            best[1].output_per_million,
            best[1].input_per_million,
            best[1].per_image,
        ):
            best = (model, price)
    assert best is not None
    return best


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


def _message_tokens(model: str, messages: Any, tools: Any) -> int:
    """Exactly `litellm.token_counter(model=, messages=, tools=)`, made of its own parts with the set-up cached."""
    if not _FAST_COUNT or litellm.disable_token_counter:
        return int(litellm.token_counter(model=model, messages=messages, tools=tools))
    params = _count_setup(model)
    msgs: Any = convert_list_message_to_dict(messages)
    tokens = _count_messages(params, msgs, False, None)
    system = any(m.get("role", None) == "system" for m in msgs)
    return int(tokens + _count_extra(params.count_function, tools, None, system))


def _text_tokens(model: str, text: str) -> int:
    """Exactly `litellm.token_counter(model=, text=)`, with the set-up cached."""
    if not _FAST_COUNT or litellm.disable_token_counter:
        return int(litellm.token_counter(model=model, text=text))
    return int(_count_setup(model).count_function(text))


def _count_tokens(model: str, data: Mapping[str, Any]) -> int:
    if "messages" in data:
        return _message_tokens(model, data["messages"], data.get("tools"))
    inputs = data.get("input", data.get("prompt", ""))
    texts: Iterable[Any] = inputs if isinstance(inputs, list) else [inputs]
    return sum(_text_tokens(model, str(t)) for t in texts)


def output_cap(data: Mapping[str, Any], price: Price) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = data.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return price.max_output_tokens or 4096


def estimate_call(
    group: str, data: Mapping[str, Any], call_type: str, settings: Settings, router: Any = None
) -> Estimate:
    """Worst case of one request: prompt tokens x input price + output cap x output price
    (embeddings: input only; images: n x price per image)."""
    model, price = price_of_group(group, settings, router)
    if "image" in call_type:
        n = data.get("n") or 1
        if not price.per_image and group not in settings.free_models:
            raise PriceUnknown(f"no per-image price for {model}")
        amount = int(n) * price.per_image
        return Estimate(amount, amount, 0, 0, 0, model)
    tokens = _count_tokens(model, data)
    input_cost = _tokens_cost(tokens, price.input_per_million)
    if "embedding" in call_type:
        return Estimate(input_cost, input_cost, 0, 0, tokens, model)
    cap = output_cap(data, price)
    amount = input_cost + _tokens_cost(cap, price.output_per_million)
    return Estimate(amount, input_cost, price.output_per_million, cap, tokens, model)


def cost_of_usage(prompt_tokens: int, completion_tokens: int, price: Price) -> int:
    """Exact integer cost of known usage at a price (used when LiteLLM reports no response_cost)."""
    return _tokens_cost(prompt_tokens, price.input_per_million) + _tokens_cost(
        completion_tokens, price.output_per_million
    )


def soft_landing(est: Estimate, min_output_tokens: int) -> SoftLanding | None:
    """Let a completion that does not fit run smaller: reserve what is left if it pays for the prompt
    plus `min_output_tokens`, and cap max_tokens to what it pays for."""
    if not est.output_per_million:
        return None
    minimum = est.input_cost + _tokens_cost(min_output_tokens, est.output_per_million)
    return SoftLanding(
        min_amount=min(minimum, est.amount),
        fixed_amount=est.input_cost,
        amount_per_million_tokens=est.output_per_million,
    )
