"""Estimates from LiteLLM's prices (exact integers, dearest deployment), subjects from requests, settings."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import litellm
import pytest

from cycles_ledger import ConfigError, InvalidRequestError, Subject
from cycles_litellm.estimate import (
    PriceUnknown,
    _chat_tokens,
    _prompt_tokens,
    _TextCounts,
    estimate_call,
    price_of_group,
)
from cycles_litellm.settings import Settings, SubjectMapping, load_settings
from cycles_litellm.subject import scope_value, subject_from_request

MSGS = [{"role": "user", "content": "hello there"}]


def test_price_is_exact_integer_per_million() -> None:
    """gpt-4o-mini's $0.15 / $0.60 per million tokens become exact USD_MICROCENTS per million."""
    _, price = price_of_group("gpt-4o-mini", Settings())
    assert (price.input_per_million, price.output_per_million) == (15_000_000, 60_000_000)
    assert price.max_output_tokens == 16384


def test_worst_case_uses_max_tokens_or_model_ceiling() -> None:
    """Worst case = counted prompt tokens x input price + output cap x output price."""
    tokens = litellm.token_counter(model="gpt-4o-mini", messages=MSGS)
    capped = estimate_call("gpt-4o-mini", {"messages": MSGS, "max_tokens": 100}, "chat", Settings())
    assert capped.input_tokens == tokens
    assert capped.amount == -(-tokens * 15_000_000 // 10**6) + 100 * 60
    uncapped = estimate_call("gpt-4o-mini", {"messages": MSGS}, "chat", Settings())
    assert uncapped.output_cap == 16384
    assert uncapped.amount == uncapped.input_cost + 16384 * 60


def test_embedding_estimate_is_input_only() -> None:
    """Embeddings cost their input tokens only."""
    est = estimate_call("text-embedding-3-small", {"input": ["a b c", "d e"]}, "embedding", Settings())
    assert est.output_cap == 0 and est.amount == est.input_cost > 0


def test_unknown_price_is_not_free() -> None:
    """A model missing from the price map is unknown (never $0) unless configured."""
    with pytest.raises(PriceUnknown):
        estimate_call("openai/private-model", {"messages": MSGS}, "chat", Settings())
    priced = Settings.model_validate(
        {"prices": {"openai/private-model": {"input_per_million": "1usd", "output_per_million": "2usd"}}}
    )
    est = estimate_call("openai/private-model", {"messages": MSGS, "max_tokens": 10}, "chat", priced)
    assert est.output_per_million == 2 * 10**8
    free = Settings.model_validate({"free_models": ["openai/private-model"]})
    assert estimate_call("openai/private-model", {"messages": MSGS}, "chat", free).amount == 0


def test_group_priced_by_dearest_deployment_and_fallback() -> None:
    """A model group is priced by its dearest deployment, fallbacks included."""
    router = litellm.Router(
        model_list=[
            {"model_name": "smart", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "x"}},
            {"model_name": "smart", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "y"}},
            {"model_name": "big", "litellm_params": {"model": "openai/gpt-4o", "api_key": "x"}},
        ],
        fallbacks=[{"smart": ["big"]}],
    )
    assert price_of_group("smart", Settings(), router)[0] == "openai/gpt-4o-mini"  # the group's own
    est = estimate_call("smart", {"messages": MSGS, "max_tokens": 10}, "chat", Settings(), router)
    assert est.model == "openai/gpt-4o" and est.output_per_million == 10 * 10**8  # its fallback costs more
    # fallbacks the request itself names (LiteLLM honours them) are priced too
    plain = litellm.Router(model_list=router.model_list)
    asked = {"messages": MSGS, "max_tokens": 10, "fallbacks": ["big"]}
    assert estimate_call("smart", asked, "chat", Settings(), plain).model == "openai/gpt-4o"
    assert estimate_call("smart", {**asked, "fallbacks": None}, "chat", Settings(), plain).model == "openai/gpt-4o-mini"


def test_the_worst_deployment_is_the_dearest_for_this_request() -> None:
    """Not the dearest output price: an input-heavy request is dearest where input costs most."""
    settings = Settings(
        prices={
            "openai/out-heavy": {
                "input_per_million": "0.10usd",
                "output_per_million": "10usd",
                "max_output_tokens": 100,
            },
            "openai/in-heavy": {"input_per_million": "5usd", "output_per_million": "1usd", "max_output_tokens": 100},
        }
    )
    router = litellm.Router(
        model_list=[
            {"model_name": "g", "litellm_params": {"model": "openai/out-heavy", "api_key": "x"}},
            {"model_name": "g", "litellm_params": {"model": "openai/in-heavy", "api_key": "x"}},
        ]
    )
    big_prompt = [{"role": "user", "content": "word " * 5000}]
    assert (
        estimate_call("g", {"messages": big_prompt, "max_tokens": 10}, "chat", settings, router).model
        == "openai/in-heavy"
    )
    small = [{"role": "user", "content": "hi"}]
    assert (
        estimate_call("g", {"messages": small, "max_tokens": 100}, "chat", settings, router).model == "openai/out-heavy"
    )


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the docs",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        },
    }
]
CONVERSATIONS = [
    MSGS,
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo " * 50, "name": "ann"}],
    [
        {"role": "user", "content": [{"type": "text", "text": "what is in the docs?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "search", "arguments": '{"q":"x"}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "nothing"},
    ],
    [],
]


@pytest.mark.parametrize("model", ["gpt-4o-mini", "openai/gpt-4o", "gpt-3.5-turbo-0301", "openai/private-model"])
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_token_count_is_litellms(model: str, messages: list[dict[str, object]], tools: object) -> None:
    """The messages count (made of token_counter's parts, its set-up cached) is exactly litellm.token_counter's;
    tools are counted as the JSON sent, never fewer tokens than LiteLLM's own rendering of them."""
    for _ in range(2):  # the second time from the cache
        expected = litellm.token_counter(model=model, messages=messages)
        if tools:
            expected += litellm.token_counter(model=model, text=json.dumps(tools)) + 2 * len(tools)
        counted = _chat_tokens(model, {"messages": messages, "tools": tools})
        assert counted == expected
        assert counted >= litellm.token_counter(model=model, messages=messages, tools=tools)
    texts = ["a b c", "héllo " * 300]
    assert sum(_prompt_tokens(model, t) for t in texts) == sum(
        litellm.token_counter(model=model, text=t) for t in texts
    )


def test_text_counts_are_remembered_within_bounds() -> None:
    """A text seen again (system prompt, earlier turns) is not re-tokenized; entries and characters are bounded."""
    calls: list[str] = []

    def count(text: str) -> int:
        calls.append(text)
        return len(text)

    counts = _TextCounts(max_entries=2, max_chars=640)
    assert [counts.count(1, count, t) for t in ("ab", "ab", "cde", "ab")] == [2, 2, 3, 2]
    assert calls == ["ab", "cde"]
    counts.count(1, count, "f")  # a third entry evicts the least recently used ("cde")
    counts.count(1, count, "cde")
    assert calls == ["ab", "cde", "f", "cde"]
    counts.count(2, count, "ab")  # another set-up (model, or the same one a minute later) counts anew
    assert calls[-1] == "ab"
    big = "x" * 11  # above max_chars / 64: counted, never kept
    counts.count(1, count, big)
    counts.count(1, count, big)
    assert calls[-2:] == [big, big]


def _req(meta: dict[str, object] | None = None, headers: dict[str, str] | None = None) -> dict[str, object]:
    return {"metadata": meta or {}, "proxy_server_request": {"headers": headers or {}}}


def test_subject_sources_in_order() -> None:
    """Without a virtual key: metadata wins over headers, headers over defaults; the proxy's metadata copies
    of key fields are not an identity (a client can send metadata)."""
    mapping = SubjectMapping(defaults={"tenant": "fallback", "workspace": "dflt"})
    s = subject_from_request(
        _req(
            {"cycles": {"tenant": "meta", "dimensions": {"run": "7"}}, "user_api_key_team_id": "team-1"},
            {"X-Cycles-Tenant": "hdr", "x-cycles-workflow": "wf"},
        ),
        None,
        mapping,
    )
    assert (s.tenant, s.workflow, s.workspace, s.dimensions) == ("meta", "wf", "dflt", {"run": "7"})
    key = SimpleNamespace(team_id="team-9", user_id="default_user_id", end_user_id=None, key_alias=None, org_id=None)
    s2 = subject_from_request(_req(), key, SubjectMapping())
    assert s2.scopes() == ["tenant:team-9"]


def test_the_key_fixes_the_payer_and_the_client_only_refines_below() -> None:
    """A virtual key's team is the tenant and its alias the app: a forged x-cycles-tenant or
    metadata.cycles.tenant is ignored, while workflow / agent / toolset from the client are kept."""
    from litellm.proxy._types import UserAPIKeyAuth

    key = UserAPIKeyAuth(api_key="sk-1", key_alias="billing-bot", team_id="team-a")
    forged = _req(
        {"cycles": {"tenant": "team-b", "app": "other", "workflow": "docs"}},
        {"x-cycles-tenant": "team-b", "x-cycles-agent": "summarizer", "x-cycles-workspace": "prod"},
    )
    s = subject_from_request(forged, key, SubjectMapping())
    assert (s.tenant, s.app, s.workflow, s.agent, s.workspace) == ("team-a", "billing-bot", "docs", "summarizer", None)
    # cycles.yaml, or the key's / team's metadata, can open more levels to the client; never a key-fixed one
    opened = subject_from_request(forged, key, SubjectMapping(client_levels=["workspace", "workflow"]))
    assert (opened.tenant, opened.workspace, opened.agent) == ("team-a", "prod", None)
    team_opened = UserAPIKeyAuth(api_key="sk-2", team_id="team-a", team_metadata={"cycles": {"client_levels": ["app"]}})
    s3 = subject_from_request(forged, team_opened, SubjectMapping())
    assert (s3.tenant, s3.app) == ("team-a", "other")
    # a key without team or organization: its user pays
    user_key = UserAPIKeyAuth(api_key="sk-3", user_id="alice@example.com")
    assert subject_from_request(forged, user_key, SubjectMapping()).tenant == scope_value("alice@example.com")


def test_a_key_without_team_org_or_user_pays_as_itself() -> None:
    """A virtual key with no team, organization or user (or owned by LiteLLM's placeholder admin user) is
    still the identity: it pays as its alias, else as a hash of its token; a forged tenant changes nothing.
    The master key (LiteLLM's alias for it) leaves every level to the request."""
    from litellm.proxy._types import LitellmUserRoles, UserAPIKeyAuth

    forged = _req({"cycles": {"tenant": "victim"}}, {"x-cycles-tenant": "victim", "x-cycles-agent": "a"})
    alias_only = UserAPIKeyAuth(api_key="sk-1", key_alias="ci-bot")
    s = subject_from_request(forged, alias_only, SubjectMapping())
    assert (s.tenant, s.agent) == ("ci-bot", "a")
    admin_owned = UserAPIKeyAuth(api_key="sk-2", token="hashed-2", user_id="default_user_id")
    s2 = subject_from_request(forged, admin_owned, SubjectMapping())
    assert s2.tenant is not None and s2.tenant.startswith("key-") and s2.tenant != "victim"
    master = UserAPIKeyAuth(api_key="litellm_proxy_master_key", user_role=LitellmUserRoles.PROXY_ADMIN)
    assert subject_from_request(forged, master, SubjectMapping()).tenant == "victim"


def test_untrusted_key_fields_cannot_fix_the_payer() -> None:
    """The end user comes from the request's `user` field: it may refine (agent) but never fix an upper
    level; the admin UI's shared dashboard team is nobody's identity."""
    from litellm.proxy._types import UserAPIKeyAuth

    with pytest.raises(ValueError, match="set by the client"):
        SubjectMapping(key_fields={"tenant": ["user_api_key_end_user_id"]})
    SubjectMapping(key_fields={"tenant": ["user_api_key_team_id"], "agent": ["user_api_key_end_user_id"]})
    dashboard = UserAPIKeyAuth(api_key="sk-ui", team_id="litellm-dashboard", user_id="alice")
    assert subject_from_request(_req(), dashboard, SubjectMapping()).tenant == "alice"


def test_any_litellm_name_is_a_scope_by_one_deterministic_rule() -> None:
    """Names with spaces or other characters map to valid, distinct scope values; valid ones stay as they are."""
    assert scope_value("team-a") == "team-a" and scope_value("Acme") == "Acme"
    mapped = scope_value("CI bot")
    assert mapped.startswith("CI_bot.") and len(mapped) == len("CI_bot.") + 8
    assert scope_value("CI bot") == mapped  # deterministic
    names = ["CI bot", "CI  bot", "CI/bot", "CI_bot", "ci bot", "x" * 300, "x" * 301, "é", "", " "]
    values = [scope_value(n) for n in names]
    assert len(set(values)) == len(values)
    assert all(len(v) <= 128 and Subject.model_validate({"tenant": v}) for v in values if v)
    from litellm.proxy._types import UserAPIKeyAuth

    key = UserAPIKeyAuth(api_key="sk-1", key_alias="CI bot", team_id="Acme Corp")
    s = subject_from_request(_req(headers={"x-cycles-agent": "my agent/1"}), key, SubjectMapping())
    assert (s.tenant, s.app, s.agent) == (scope_value("Acme Corp"), scope_value("CI bot"), scope_value("my agent/1"))


def test_subject_from_the_proxys_own_key_object() -> None:
    """The levels come from LiteLLM's UserAPIKeyAuth itself, whose attribute names differ from the
    proxy's metadata names (`key_alias` for `user_api_key_alias`)."""
    from litellm.proxy._types import UserAPIKeyAuth

    key = UserAPIKeyAuth(api_key="sk-1", key_alias="billing-bot", team_id="team-4", end_user_id="cust-9")
    s = subject_from_request(_req(), key, SubjectMapping())
    assert (s.tenant, s.app) == ("team-4", "billing-bot")


def test_subject_metadata_and_header_precedence() -> None:
    """`metadata` wins over `litellm_metadata`; the request's own headers over those copied into metadata."""
    req = {
        "litellm_metadata": {
            "cycles": {"tenant": "old"},
            "headers": {"x-cycles-agent": "a1"},
            "user_api_key_alias": "k",
        },
        "metadata": {"cycles": {"tenant": "new"}, "headers": {"X-Cycles-Workflow": "w1"}},
        "proxy_server_request": {"headers": {"x-cycles-workflow": "w2"}},
    }
    s = subject_from_request(req, None, SubjectMapping())
    assert (s.tenant, s.workflow, s.agent, s.app) == ("new", "w2", None, None)
    assert subject_from_request(req, None, SubjectMapping()) == s  # same callers: the validated Subject is reused
    no_headers = subject_from_request(req, None, SubjectMapping(from_headers=False))
    assert (no_headers.tenant, no_headers.workflow) == ("new", None)


@pytest.mark.parametrize("req", [_req(), _req({"cycles": "acme"}), _req(headers={"x-cycles-unknown": "a"})])
def test_subject_errors(req: dict[str, object]) -> None:
    """No payer at all, or malformed metadata, is InvalidRequestError (400 when enforcing)."""
    with pytest.raises(InvalidRequestError):
        subject_from_request(req, None, SubjectMapping())


def test_settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped settings load; broken files are ConfigErrors naming the file; shadow scopes apply below."""
    assert load_settings("configs/cycles.yaml").mode == "enforce"
    bad = tmp_path / "c.yaml"
    bad.write_text("mode: sometimes\n")
    with pytest.raises(ConfigError, match=r"c\.yaml"):
        load_settings(bad)
    bad.write_text("mode: [enforce\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2"):
        load_settings(bad)
    monkeypatch.setenv("CYCLES_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()
    s = Settings(shadow_scopes=["tenant:trial"])
    assert s.is_shadow(["tenant:trial", "tenant:trial/agent:a"]) and not s.is_shadow(["tenant:trialx"])
    assert not s.fail_open() and Settings(mode="shadow").fail_open()
    assert Settings(on_unavailable="fail_open").fail_open()
