"""A webhook endpoint on loopback for tests: records every post, answers the statuses queued in `plan`."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Receiver"]


class Receiver:
    """A webhook endpoint: records every post, answers the statuses queued in `plan` (then 200)."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.plan: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                status = outer.plan.pop(0) if outer.plan else 200
                outer.posts.append({"status": status, "body": body, "headers": dict(self.headers)})
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def delivered(self) -> list[dict[str, Any]]:
        return [json.loads(p["body"]) for p in self.posts if p["status"] == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
