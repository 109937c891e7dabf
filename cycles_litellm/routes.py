"""Which LiteLLM call types the plugin meters, which cost nothing, and which it refuses.

LiteLLM runs the pre-call hook with a `call_type` per route (`acompletion` for /v1/chat/completions,
`anthropic_messages` for /v1/messages, `pass_through_endpoint` for /anthropic/..., ...). The plugin
knows how to estimate, clamp and settle a few of them (METERED); some never reach a billable provider
call (FREE: reads, listings, deletes, cancels, token counting); everything else - including any call
type a future LiteLLM adds - is refused before the provider with 402 ROUTE_NOT_METERED, unless
cycles.yaml lets it through by name (`unmetered_routes:`). Refusing by default is what keeps a
LiteLLM upgrade from opening a hole silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["FREE", "METERED", "MODEL_SEGMENTS", "Kind", "Route", "classify", "path_class"]

Kind = Literal[
    "chat",
    "text",
    "embedding",
    "messages",
    "responses",
    "image",
    "speech",
    "transcription",
    "rerank",
    "free",
    "refused",
]


@dataclass(frozen=True, slots=True)
class Route:
    call_type: str
    kind: Kind

    @property
    def metered(self) -> bool:
        return self.kind not in ("free", "refused")


# call_type (with and without LiteLLM's "a" prefix for async) -> how it is estimated and settled
METERED: dict[str, Kind] = {}
for _kind, _names in {
    "chat": ("completion",),
    "text": ("text_completion",),
    "embedding": ("embedding",),
    "messages": ("anthropic_messages",),
    "responses": ("responses",),
    "image": ("image_generation",),
    "speech": ("speech",),
    "transcription": ("transcription",),
    "rerank": ("rerank",),
}.items():
    for _name in _names:
        METERED[_name] = METERED["a" + _name] = _kind  # type: ignore[assignment]
METERED["aanthropic_messages"] = "messages"

# Call types that never make a billable provider call: reading, listing, deleting or cancelling what
# exists, uploading a file (a later batch or fine-tune that uses it is refused unless allowed),
# counting tokens, and moderation (free at OpenAI; elsewhere refused unless free_models says so: handler.py).
FREE: frozenset[str] = frozenset(
    name
    for base in (
        "moderation",
        "file_retrieve",
        "file_delete",
        "file_list",
        "file_content",
        "create_file",
        "retrieve_batch",
        "list_batches",
        "cancel_batch",
        "get_responses",
        "delete_responses",
        "cancel_responses",
        "list_input_items",
        "retrieve_fine_tuning_job",
        "list_fine_tuning_jobs",
        "cancel_fine_tuning_job",
        "get_assistants",
        "delete_assistant",
        "get_thread",
        "get_messages",
        "video_retrieve",
        "video_content",
        "video_list",
        "video_retrieve_job",
        "video_delete",
        "video_status",
        "video_get_character",
        "vector_store_retrieve",
        "vector_store_list",
        "vector_store_delete",
        "vector_store_file_list",
        "vector_store_file_retrieve",
        "vector_store_file_content",
        "vector_store_file_delete",
        "list_containers",
        "retrieve_container",
        "delete_container",
        "list_container_files",
        "retrieve_container_file_content",
        "list_skills",
        "get_skill",
        "delete_skill",
        "list_evals",
        "get_eval",
        "delete_eval",
        "list_runs",
        "get_run",
        "delete_run",
        "get_interaction",
        "delete_interaction",
        "cancel_interaction",
        "list_agents",
        "get_agent",
        "delete_agent",
        "list_agent_versions",
        "list_mcp_tools",
        "count_tokens",
    )
    for name in (base, "a" + base)
)


def classify(call_type: str, allowed_unmetered: frozenset[str] = frozenset()) -> Route:
    """The plugin's treatment of one call type; `allowed_unmetered` (cycles.yaml `unmetered_routes`) turns
    a refused call type into a free one - the operator's explicit choice, logged as such."""
    kind = METERED.get(call_type)
    if kind is not None:
        return Route(call_type, kind)
    if call_type in FREE or call_type in allowed_unmetered:
        return Route(call_type, "free")
    return Route(call_type, "refused")


# --- the proxy's HTTP routes ---------------------------------------------------------------------------
# Every path LiteLLM's proxy serves, by its first segment once the version or deployment prefix is removed.
# "model": the route reaches a provider; the pre-call hook meters it or refuses it by call type, and the
# deployment gate refuses a metered call type whose request skipped the hook. "control": the proxy's own
# management, auth, UI, health or reporting; no model call. tests/e2e/test_route_inventory.py fails on a
# path missing here, so a LiteLLM upgrade that adds a route is classified by a person, not by accident.
_PREFIXES = (
    re.compile(r"^/openai/deployments/\{[^}]+\}(?=/)"),
    re.compile(r"^/engines/\{[^}]+\}(?=/)"),
    re.compile(r"^/openai/v1(?=/)"),
    re.compile(r"^/(?:v1beta|v1|v2)(?=/)"),
)

MODEL_SEGMENTS: dict[str, str] = {
    # metered (call types in METERED; FREE for reads, lists, deletes and cancels)
    "chat": "acompletion",
    "completions": "atext_completion",
    "embeddings": "aembedding",
    "messages": "anthropic_messages (count_tokens: free)",
    "responses": "aresponses (get / delete / cancel / input_items: free; compact, input_tokens: refused)",
    "images": "image_generation (edits: refused)",
    "audio": "aspeech, transcription",
    "rerank": "arerank",
    "moderations": "moderation (free)",
    "queue": "acompletion",
    "prompts": "acompletion (/prompts/test)",
    # refused by call type unless cycles.yaml's unmetered_routes lets them through
    "batches": "acreate_batch (retrieve / list / cancel: free)",
    "fine_tuning": "acreate_fine_tuning_job (retrieve / list / cancel: free)",
    "files": "acreate_file, afile_* (free: a file is not a model call)",
    "realtime": "_arealtime, acreate_realtime_client_secret, arealtime_calls, ...",
    "live": "_arealtime (websocket)",
    "videos": "avideo_generation, avideo_remix, avideo_edit, ... (status / content / list: free)",
    "ocr": "aocr",
    "search": "asearch",
    "interactions": "acreate_interaction",
    "models": "agenerate_content, agenerate_content_stream (Gemini native; GET /models: control)",
    "assistants": "acreate_assistants (get / delete: free)",
    "threads": "acreate_thread, a_add_message, arun_thread (skips the hooks: the deployment gate refuses it)",
    "vector_stores": "avector_store_create, avector_store_search, avector_store_file_create, ...",
    "vector_store": "avector_store_* (management of indexes)",
    "containers": "acreate_container, aupload_container_file, ...",
    "evals": "acreate_eval, acreate_run, ...",
    "skills": "acreate_skill (list / get / delete: free)",
    "agents": "acreate_agent, ... (Gemini agents)",
    "a2a": "asend_message",
    "mcp": "call_mcp_tool (list_mcp_tools: free)",
    "mcp-rest": "call_mcp_tool",
    "{mcp_server_name}": "MCP",
    "toolset": "MCP",
    "rag": "aingest, aquery",
    "indexes": "aingest",
    "decisions": "adecisions",
    "systemone": "asystemone",
    "workflows": "agent workflow runs",
    "guardrails": "apply_guardrail",
    "apply_guardrail": "apply_guardrail",
    "cursor": "pass_through_endpoint",
    "transcribe": "pass_through_endpoint (AWS Transcribe)",
    "typesafe": "pass_through_endpoint",
    "{endpoint}": "pass_through_endpoint",
    "{provider}": "allm_passthrough_route",
}
# Provider pass-through routes (/anthropic/..., /openai/..., /bedrock/..., ...): call type pass_through_endpoint.
PASS_THROUGH_SEGMENTS = frozenset(
    {
        "anthropic",
        "openai",
        "openai_passthrough",
        "azure",
        "azure_ai",
        "azure_speech",
        "assemblyai",
        "eu.assemblyai",
        "bedrock",
        "cohere",
        "gemini",
        "vertex_ai",
        "mistral",
        "openrouter",
        "vllm",
        "watsonx",
        "nvidia_nim",
        "fal_ai",
        "gigachat",
        "milvus",
        "langfuse",
        "bespoke",
        "laya",
        "tinyfish",
        "comprehendmedical",
        "moyai",
    }
)
CONTROL_SEGMENTS = frozenset(
    {
        "",
        ".well-known",
        "_next",
        "access_group",
        "active",
        "adaptive_router",
        "add",
        "agent",
        "alerting",
        "api",
        "audit",
        "authorize",
        "auto_router",
        "budget",
        "cache",
        "callback",
        "callbacks",
        "claude-code",
        "cloudzero",
        "compliance",
        "config",
        "config_overrides",
        "coordination_redis",
        "cost",
        "cost_optimization",
        "credentials",
        "customer",
        "debug",
        "delete",
        "docs",
        "email",
        "end_user",
        "fallback",
        "gateway",
        "get",
        "get_favicon",
        "get_image",
        "get_logo_url",
        "global",
        "health",
        "introspect",
        "invitation",
        "jwt",
        "key",
        "lazy",
        "lens",
        "liteadmin",
        "litellm",
        "litellm-asset-prefix",
        "login",
        "logs",
        "management",
        "memory",
        "memory-usage-in-mem-cache",
        "memory-usage-in-mem-cache-items",
        "model",
        "model-insights",
        "model_group",
        "model_hub",
        "onboarding",
        "openapi.json",
        "organization",
        "otel-spans",
        "plugin-proxy",
        "policies",
        "policy",
        "project",
        "provider",
        "public",
        "redoc",
        "register",
        "reload",
        "revoke",
        "robots.txt",
        "router",
        "routes",
        "rust_control_plane",
        "schedule",
        "scim",
        "search_tools",
        "session",
        "settings",
        "spend",
        "sso",
        "swagger",
        "tag",
        "team",
        "telemetry",
        "test",
        "token",
        "tool",
        "traces",
        "ui",
        "unified_access_group",
        "update",
        "upload",
        "usage",
        "user",
        "utils",
        "v1",
        "v3",
        "vantage",
    }
)


def path_class(path: str) -> str | None:
    """ "model", "pass_through" or "control" for a proxy path; None when this table does not know it."""
    bare = path
    for prefix in _PREFIXES:
        bare = prefix.sub("", bare, count=1)
    segment = bare.lstrip("/").split("/", 1)[0].split(":", 1)[0]
    if segment in PASS_THROUGH_SEGMENTS:
        return "pass_through"
    if segment in MODEL_SEGMENTS:
        return "model"
    if segment in CONTROL_SEGMENTS:
        return "control"
    return None
