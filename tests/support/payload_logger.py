"""A LiteLLM CustomLogger for the e2e tests: appends every standard_logging_object it is handed (success and
failure) as one JSON line to the file `$CYCLES_PAYLOAD_LOG` names. configs/litellm-observability.yaml lists
it as `tests.support.payload_logger.payload_logger`; it reads the payload as any logger would."""

from __future__ import annotations

import json
import os
from typing import Any

from litellm.integrations.custom_logger import CustomLogger

__all__ = ["PayloadLogger", "payload_logger"]


class PayloadLogger(CustomLogger):
    def _write(self, event: str, kwargs: dict[str, Any]) -> None:
        path = os.environ.get("CYCLES_PAYLOAD_LOG")
        if not path:
            return
        line = json.dumps({"event": event, "payload": kwargs.get("standard_logging_object")}, default=str)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._write("success", kwargs)

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._write("failure", kwargs)


payload_logger = PayloadLogger()
