"""The budget subject of the work in progress, carried by contextvars.

Integrations that cannot be handed a subject explicitly (the LiteLLM SDK wrappers, `@metered`) read
it from here, so an agent's LLM calls and tool calls made inside one scope draw on one budget.
"""

from __future__ import annotations

from contextvars import ContextVar

from .models import Subject

__all__ = ["current_subject", "subject_var"]

subject_var: ContextVar[Subject | None] = ContextVar("cycles_subject", default=None)


def current_subject() -> Subject | None:
    return subject_var.get()
