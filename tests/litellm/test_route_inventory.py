"""Every route the installed LiteLLM proxy serves is known to the plugin: it reaches a provider (metered or
refused by call type), is a provider pass-through (refused), or is the proxy's own control plane. A LiteLLM
upgrade that adds a route fails here until someone classifies it in cycles_litellm/routes.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cycles_litellm.routes import METERED, MODEL_SEGMENTS, path_class

README = Path(__file__).resolve().parents[2] / "README.md"

_LIST_ROUTES = """
import json, os, warnings
warnings.simplefilter("ignore")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
from litellm.proxy.proxy_server import app

def walk(routes):
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):  # FastAPI's included routers
            yield from walk(candidates())
            low = getattr(route, "effective_low_priority_routes", None)
            if callable(low):
                yield from walk(low())
        else:
            yield route

paths = set(app.openapi()["paths"])  # documented routes
paths |= {p for r in walk(list(app.routes)) if isinstance(p := getattr(r, "path", None), str)}  # and the rest
print(json.dumps(sorted(paths)))
"""


@pytest.fixture(scope="module")
def proxy_paths() -> set[str]:
    """The installed LiteLLM proxy's routes, listed in a child process (importing the proxy changes globals)."""
    out = subprocess.run([sys.executable, "-c", _LIST_ROUTES], capture_output=True, text=True, timeout=300, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_proxy_has_routes_to_check(proxy_paths: set[str]) -> None:
    assert len(proxy_paths) > 300
    assert {"/v1/chat/completions", "/v1/messages", "/v1/responses", "/anthropic/{endpoint}"} <= proxy_paths


def test_every_proxy_route_is_classified(proxy_paths: set[str]) -> None:
    unknown = sorted(p for p in proxy_paths if path_class(p) is None)
    assert not unknown, (
        f"{len(unknown)} LiteLLM proxy route(s) unknown to cycles_litellm/routes.py (a LiteLLM upgrade?): "
        f"{unknown[:20]}; classify each as a model route, a pass-through or control"
    )


def test_classification_examples() -> None:
    assert path_class("/v1/chat/completions") == path_class("/openai/deployments/{model}/chat/completions") == "model"
    assert path_class("/v1beta/models/{model_name:path}:generateContent") == "model"
    assert path_class("/anthropic/{endpoint}") == path_class("/openai/{endpoint}") == "pass_through"
    assert path_class("/key/generate") == "control"
    assert path_class("/v1/brand-new-billable-thing") is None


def test_the_readme_route_table_names_routes_the_proxy_serves_and_metered_call_types(proxy_paths: set[str]) -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `/v1/")]
    assert len(rows) >= 9
    for row in rows:
        path, call_type = re.match(r"\| `([^`]+)` \(`([^`]+)`\)", row).groups()  # type: ignore[union-attr]
        assert path in proxy_paths, path
        assert call_type in METERED, call_type
    assert {path_class(p) for p in proxy_paths} == {"model", "pass_through", "control"}
    # every model segment names at least one route the proxy serves (no stale entries)
    model_paths = {p for p in proxy_paths if path_class(p) == "model"}
    for segment in MODEL_SEGMENTS:
        assert any(f"/{segment}" in p for p in model_paths), segment
