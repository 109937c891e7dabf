"""What LiteLLM's own cost calculator bills an answer: the control the estimate tests compare holds with."""

from __future__ import annotations

import litellm
from litellm.types.utils import ModelResponse, PromptTokensDetailsWrapper, Usage

USD = 10**8  # USD_MICROCENTS per dollar


def gemini_billed(model: str, prompt: int, completion: int, searches: int = 0, maps: int = 0) -> int:
    """USD_MICROCENTS LiteLLM charges a Gemini answer grounded with `searches` Google Search queries and `maps`
    Google Maps queries (the counts Gemini reports in its usage)."""
    details = PromptTokensDetailsWrapper(
        web_search_requests=searches or None, google_maps_grounding_requests=maps or None
    )
    usage = Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details=details,
    )  # fmt: skip
    answer = ModelResponse(
        model=model,
        usage=usage,
        choices=[{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}],
    )
    return int(litellm.completion_cost(completion_response=answer, model=model) * USD)
