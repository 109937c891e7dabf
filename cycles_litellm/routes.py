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

from dataclasses import dataclass
from typing import Literal

__all__ = ["FREE", "METERED", "ROUTE_TABLE", "Kind", "Route", "classify"]

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
# counting tokens, and moderation (free at OpenAI; LiteLLM prices it at 0).
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


# The README's route table, kept next to the code it documents (tests check both agree).
ROUTE_TABLE: tuple[tuple[str, str, str, str, str], ...] = (
    # route, call types, estimate (worst case), clamp sent to the provider, settled from
    (
        "/v1/chat/completions",
        "acompletion",
        "messages + tools (as JSON) x input price + n x output cap x output price",
        "`max_completion_tokens` or `max_tokens` (the one the client used)",
        "response_cost; streams without usage: streamed text counted",
    ),
    (
        "/v1/completions",
        "atext_completion",
        "prompts x input price + prompts x max(n, best_of) x output cap x output price",
        "`max_tokens`",
        "response_cost; streams without usage: streamed text counted",
    ),
    (
        "/v1/embeddings",
        "aembedding",
        "input texts x input price",
        "-",
        "response_cost",
    ),
    (
        "/v1/messages",
        "anthropic_messages",
        "system + messages + tools x input price + `max_tokens` x output price",
        "`max_tokens`",
        "response_cost (streams: usage of message_delta)",
    ),
    (
        "/v1/responses",
        "aresponses",
        "instructions + input items + tools x input price + `max_output_tokens` x output price",
        "`max_output_tokens`",
        "response_cost (streams: usage of response.completed)",
    ),
    (
        "/v1/images/generations",
        "image_generation",
        "prompt x input price + n x LiteLLM's price per image at the size and quality (worst when absent)",
        "-",
        "response_cost",
    ),
    (
        "/v1/audio/speech",
        "aspeech",
        "input characters x price per character (or tokens x price per token)",
        "-",
        "response_cost",
    ),
    (
        "/v1/audio/transcriptions",
        "transcription",
        "audio seconds (read from the WAV file) x price per second",
        "-",
        "response_cost",
    ),
    (
        "/v1/rerank",
        "rerank",
        "search units (100 documents each) x price per query + tokens x input price",
        "-",
        "response_cost",
    ),
    (
        "pass-through (/anthropic/..., /openai/..., ...), batches, fine-tuning, realtime, assistants runs, "
        "video, OCR, search, Gemini-native, image edits, any other",
        "pass_through_endpoint, acreate_batch, ...",
        "refused: 402 ROUTE_NOT_METERED (or let through by `unmetered_routes:`)",
        "-",
        "-",
    ),
)
