"""The indexed fallback walk (`estimate.fallback_groups`) against the plain walk it replaced, kept below as the
oracle (each group reached scans every entry of every list: quadratic, and plainly LiteLLM's matching rule):
for any router configuration and request, the same groups are priced, the same hold is taken, and the same
requests are refused. Also: a provider-prefixed group's own key lists its targets once (a request naming 9
fallbacks is not counted as 18), and fallback lists edited in place are followed at once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cycles_litellm import Settings
from cycles_litellm import estimate as est
from cycles_litellm.estimate import RequestInvalid, estimate_call, fallback_groups

# --- the plain walk (the estimate's until the index), verbatim but for names ----------------------------------


def _old_fallback_targets(group: str, entries: Any) -> list[str]:
    out: list[str] = []
    names = est._names(group)
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, Mapping):
            if isinstance(entry.get("model"), str):
                out.append(entry["model"])
            for key, targets in entry.items():
                if key == "*" or (isinstance(key, str) and est._names(key) & names):
                    for t in targets if isinstance(targets, list) else [targets]:
                        target = t.get("model") if isinstance(t, Mapping) else t
                        if isinstance(target, str):
                            out.append(target)
    return out


def old_fallback_groups(group: str, data: Mapping[str, Any], router: Any) -> list[str]:
    requested: list[str] = []
    for key in est._FALLBACK_KEYS:
        entries = data.get(key)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise RequestInvalid(f"{key} must be a list")
        for entry in entries:
            if isinstance(entry, Mapping):
                est._overrides(f"an entry of {key}", entry, allowed=frozenset({"model"}))
                for targets in entry.values():
                    for t in targets if isinstance(targets, list) else [targets]:
                        if isinstance(t, Mapping):
                            est._overrides(f"a target in {key}", t, allowed=frozenset({"model"}))
        requested += [g for g in _old_fallback_targets(group, entries) if g not in requested]
    if len(requested) > est._MAX_REQUEST_FALLBACKS:
        raise RequestInvalid(f"{len(requested)} fallback models in one request; the plugin prices up to 16")
    sources = [getattr(router, key, None) for key in est._FALLBACK_KEYS] if router is not None else []
    override = data.get("router_settings_override")
    if isinstance(override, Mapping):
        sources += [override.get(key) for key in est._FALLBACK_KEYS]
    groups = [group, *(g for g in requested if g != group)]
    for g in groups:
        for source in sources:
            if source:
                groups += [t for t in _old_fallback_targets(g, source) if t not in groups]
    return groups


def _outcome(fn: Any, group: str, data: Mapping[str, Any], router: Any) -> Any:
    try:
        return ("ok", frozenset(fn(group, data, router)))
    except RequestInvalid as exc:
        return ("refused", type(exc).__name__)


def _router(**lists: Any) -> SimpleNamespace:
    return SimpleNamespace(
        **{"fallbacks": None, "context_window_fallbacks": None, "content_policy_fallbacks": None, **lists}
    )


# --- 1. a provider-prefixed group's own key counts its targets twice -----------------------------------------


def test_a_request_naming_nine_fallbacks_for_a_provider_prefixed_group_is_not_refused() -> None:
    """A request may name up to 16 fallback models. For a group whose name has a provider prefix
    (`openai/gpt-4o`, a usual model_name on a proxy), `{"openai/gpt-4o": [9 models]}` names 9, and the plain walk
    accepted it. `_FallbackIndex.of` files the key's targets under both of its names (`openai/gpt-4o` and
    `gpt-4o`) and `targets()` reads both names of the group: each key is taken once, not once per name, else
    18 > 16 and the request would be refused with 400 REQUEST_INVALID."""
    nine = [f"m{i}" for i in range(9)]
    data = {"model": "openai/gpt-4o", "fallbacks": [{"openai/gpt-4o": nine}]}
    assert set(old_fallback_groups("openai/gpt-4o", data, None)) == {"openai/gpt-4o", *nine}
    assert set(fallback_groups("openai/gpt-4o", data, None)) == {"openai/gpt-4o", *nine}


def test_fallback_targets_lists_each_target_once_per_matching_key() -> None:
    """The root of the above: a matching key's targets are listed once, as the plain walk lists them."""
    entries = [{"openai/gpt-4o": ["a", "b"]}]
    assert _old_fallback_targets("openai/gpt-4o", entries) == ["a", "b"]
    assert est._fallback_targets("openai/gpt-4o", entries) == ["a", "b"]


# --- 2. the router index is stale after an in-place change of the same length ---------------------------------


def test_an_entry_replaced_in_place_is_followed_at_once() -> None:
    """An entry replaced in place (`router.fallbacks[0] = ...`, the list shared with `litellm.fallbacks` or the
    caller's config) is followed by the next estimate: the index is built for each request, never cached (a
    cache keyed on the list would miss it, and price less than the router may reach)."""
    router = _router(fallbacks=[{"g0": ["g1"]}])
    data = {"model": "g0"}
    assert fallback_groups("g0", data, router) == ["g0", "g1"]
    router.fallbacks[0] = {"g0": ["g2"]}
    assert set(old_fallback_groups("g0", data, router)) == {"g0", "g2"}
    assert set(fallback_groups("g0", data, router)) == {"g0", "g2"}


def test_a_target_appended_to_an_entry_is_followed_at_once() -> None:
    """Same with the targets of an entry grown in place (`router.fallbacks[0]["g0"].append("g2")`), the outer
    list keeping its length."""
    router = _router(fallbacks=[{"g0": ["g1"]}])
    data = {"model": "g0"}
    assert fallback_groups("g0", data, router) == ["g0", "g1"]
    router.fallbacks[0]["g0"].append("g2")
    assert set(old_fallback_groups("g0", data, router)) == {"g0", "g1", "g2"}
    assert set(fallback_groups("g0", data, router)) == {"g0", "g1", "g2"}


# --- 3. differential property: same groups (as a set), same refusals ------------------------------------------

_NAMES = st.sampled_from(["a", "b", "openai/a", "azure/a", "openai/b", "c", "*", "openai/*", "model", "x/y/z"])
_TARGET = st.one_of(_NAMES, st.builds(lambda m: {"model": m}, _NAMES), st.none(), st.integers(0, 3))
_TARGETS = st.one_of(st.lists(_TARGET, max_size=4), _TARGET, st.tuples(_NAMES))
_KEY = st.one_of(_NAMES, st.integers(0, 3), st.tuples(_NAMES))
_ENTRY = st.one_of(
    _NAMES,
    st.none(),
    st.integers(0, 3),
    st.dictionaries(_KEY, _TARGETS, max_size=3),
    st.builds(lambda m, extra: {"model": m, **extra}, _NAMES, st.dictionaries(_NAMES, _TARGETS, max_size=2)),
)
_SOURCE = st.one_of(st.none(), st.lists(_ENTRY, max_size=5), st.tuples(_ENTRY), st.dictionaries(_NAMES, _TARGETS))


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    group=_NAMES,
    fb=_SOURCE,
    cw=_SOURCE,
    cp=_SOURCE,
    req=st.one_of(st.none(), st.lists(_ENTRY, max_size=6)),
    override=st.one_of(st.none(), st.fixed_dictionaries({"fallbacks": _SOURCE})),
)
def test_the_walk_reaches_the_same_groups_as_before(
    group: str, fb: Any, cw: Any, cp: Any, req: Any, override: Any
) -> None:
    router = _router(fallbacks=fb, context_window_fallbacks=cw, content_policy_fallbacks=cp)
    data: dict[str, Any] = {"model": group}
    if req is not None:
        data["fallbacks"] = req
    if override is not None:
        data["router_settings_override"] = override
    assert _outcome(fallback_groups, group, data, router) == _outcome(old_fallback_groups, group, data, router)


# --- 4. the hold itself: estimate_call with the indexed walk and the dedup vs the plain walk -----------------

_MODELS = ["openai/gpt-4o-mini", "openai/o1", "openai/gpt-4o", "openai/gpt-4o-mini", "openai/o1", "openai/gpt-4.1"]
_ROUTER = litellm.Router(
    model_list=[
        {"model_name": name, "litellm_params": {"model": m, "api_key": "x"}}
        for name, m in zip(["a", "b", "openai/a", "azure/a", "openai/b", "c"], _MODELS, strict=True)
    ]
    + [{"model_name": "c", "litellm_params": {"model": "openai/o1", "api_key": "x"}}],
    num_retries=0,
)
_GROUP_NAMES = st.sampled_from(["a", "b", "openai/a", "azure/a", "openai/b", "c"])
_ROUTER_ENTRY = st.one_of(
    _GROUP_NAMES.map(lambda g: {"*": [g]}),
    st.dictionaries(
        st.sampled_from(["a", "b", "openai/a", "azure/a", "openai/b", "c", "openai/*"]),
        st.lists(_GROUP_NAMES, max_size=3),
        max_size=2,
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(group=_GROUP_NAMES, fb=st.lists(_ROUTER_ENTRY, max_size=5), cw=st.lists(_ROUTER_ENTRY, max_size=2))
def test_the_hold_is_the_same_as_with_the_old_walk(group: str, fb: Any, cw: Any) -> None:
    _ROUTER.fallbacks = fb
    _ROUTER.context_window_fallbacks = cw
    data = {"model": group, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    s = Settings()
    new = estimate_call(group, data, "chat", s, _ROUTER)
    orig = est.fallback_groups
    try:
        est.fallback_groups = old_fallback_groups  # type: ignore[assignment]
        old = estimate_call(group, data, "chat", s, _ROUTER)
    finally:
        est.fallback_groups = orig  # type: ignore[assignment]
    assert new.amount == old.amount
