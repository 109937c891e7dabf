"""`budget_scope(...)`: who pays for the work inside, carried by contextvars.

    with budget_scope(tenant="acme", workflow="doc-processing"):
        async with budget_scope(agent="summarizer"):     # refines the parent: tenant and workflow kept
            await search("...")                           # @metered tools and cycles_litellm calls charge here

Works across `asyncio.gather` (tasks copy the context) and in threads started with
`contextvars.copy_context().run`.
"""

from __future__ import annotations

from contextvars import Token
from types import TracebackType
from typing import Any

from cycles_ledger import Subject
from cycles_ledger.context import current_subject, subject_var

__all__ = ["budget_scope", "current_subject", "litellm_headers", "litellm_metadata"]

_LEVELS = ("tenant", "workspace", "app", "workflow", "agent", "toolset")


class budget_scope:
    """Sync and async context manager that sets (or refines) the current budget subject."""

    def __init__(
        self,
        tenant: str | None = None,
        workspace: str | None = None,
        app: str | None = None,
        workflow: str | None = None,
        agent: str | None = None,
        toolset: str | None = None,
        *,
        run: str | None = None,
        dimensions: dict[str, str] | None = None,
    ) -> None:
        self.fields: dict[str, Any] = {
            k: v
            for k, v in dict(
                tenant=tenant, workspace=workspace, app=app, workflow=workflow, agent=agent, toolset=toolset
            ).items()
            if v is not None
        }
        dims = dict(dimensions or {})
        if run is not None:
            dims["run"] = run
        self.dimensions = dims
        self._tokens: list[Token[Subject | None]] = []

    def subject(self) -> Subject:
        """The subject this scope sets: the parent's fields, overridden and extended by this scope's."""
        parent = current_subject()
        base = parent.model_dump(exclude_none=True) if parent is not None else {}
        dims = {**(base.pop("dimensions", None) or {}), **self.dimensions}
        return Subject.model_validate({**base, **self.fields, **({"dimensions": dims} if dims else {})})

    def __enter__(self) -> Subject:
        subject = self.subject()
        self._tokens.append(subject_var.set(subject))
        return subject

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        subject_var.reset(self._tokens.pop())

    async def __aenter__(self) -> Subject:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def litellm_headers(subject: Subject | None = None) -> dict[str, str]:
    """Headers that put a call through the LiteLLM proxy on the current subject (`x-cycles-<level>`)."""
    s = subject or current_subject()
    if s is None:
        return {}
    return {f"x-cycles-{lvl}": getattr(s, lvl) for lvl in _LEVELS if getattr(s, lvl)}


def litellm_metadata(subject: Subject | None = None) -> dict[str, Any]:
    """`metadata` for a LiteLLM request (proxy or SDK) that charges the current subject."""
    s = subject or current_subject()
    if s is None:
        return {}
    return {"cycles": s.model_dump(exclude_none=True)}
