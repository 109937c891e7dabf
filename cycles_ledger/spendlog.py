"""Past spend as the ledger sees it: one record per paid call, whatever log it was read from.

Readers of real logs (LiteLLM's standard logging payload, Langfuse exports: `cycles_litellm.spend_logs`)
turn each line into a `SpendRecord`; `replay` and `suggest` only read these, so they never depend on a log
format. Lines a reader cannot use are kept as `SkippedLine` with their place, counted and reported.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from .models import SoftLanding, Subject

__all__ = ["SkippedLine", "SpendLog", "SpendRecord", "iso_ms"]


@dataclass(frozen=True, slots=True)
class SpendRecord:
    """One call that was paid for: who paid (`subject`), when, what it cost and what the proxy would have held.

    Amounts are USD_MICROCENTS. `estimate` None means the log has no estimate: the call holds its actual cost.
    `line` is where the record was read (1-based line of a JSONL file, or item number in a JSON document)."""

    call_id: str
    start_ms: int
    end_ms: int
    subject: Subject
    actual: int
    estimate: int | None = None
    model: str = ""
    kind: str = "llm.completion"  # the ledger action kind
    name: str = ""  # the ledger action name (`openai:gpt-4o`, a tool's name)
    run: str | None = None  # the agent run / trace / session the call belongs to, if the log says
    tokens: int | None = None  # tokens used (prompt + completion), for TOKENS budgets
    token_estimate: int | None = None  # tokens the proxy would have held
    soft_landing: SoftLanding | None = None  # how the proxy would have shrunk a call that does not fit
    line: int = 0
    source: str = ""  # the file it came from


@dataclass(frozen=True, slots=True)
class SkippedLine:
    """A line (or item) a reader could not use, and why; never fatal."""

    source: str
    line: int
    error: str

    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.source else f"line {self.line}"


@dataclass
class SpendLog:
    """What a reader made of its input: the records in time order, and what it left out."""

    records: list[SpendRecord] = field(default_factory=list)
    skipped: list[SkippedLine] = field(default_factory=list)
    duplicates: int = 0  # records whose id had been read already (the same call logged twice)
    ignored: int = 0  # well-formed lines that are not paid calls (spans, traces, list calls)
    unattributed: list[SkippedLine] = field(default_factory=list)  # paid calls with no payer the proxy could name
    sources: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)

    def sort(self) -> None:
        self.records.sort(key=lambda r: (r.start_ms, r.end_ms, r.source, r.line))

    @property
    def spend(self) -> int:
        return sum(r.actual for r in self.records)

    def summary(self) -> dict[str, object]:
        """Counts of what was read and left out, for reports (`skipped` lists each bad line)."""
        first = self.records[0].start_ms if self.records else None
        last = max((r.end_ms for r in self.records), default=None)
        return {
            "sources": self.sources,
            "formats": self.formats,
            "calls": len(self.records),
            "spend": self.spend,
            "first": iso_ms(first) if first is not None else None,
            "last": iso_ms(last) if last is not None else None,
            "skipped": len(self.skipped),
            "duplicates": self.duplicates,
            "ignored": self.ignored,
            "unattributed": len(self.unattributed),
        }


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as ISO 8601 in UTC (`2026-11-27T18:00:00.000Z`)."""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
