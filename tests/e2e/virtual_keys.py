"""LiteLLM virtual keys without a database, for the e2e tests: a `general_settings.custom_auth` hook that
answers real `UserAPIKeyAuth` objects for a few fixed keys (`custom_auth: tests.e2e.virtual_keys.user_api_key_auth`).
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from litellm.proxy._types import LitellmUserRoles, UserAPIKeyAuth

MASTER_KEY = "sk-test-master"
KEYS: dict[str, dict[str, Any]] = {
    "sk-team-a": {"team_id": "team-a", "key_alias": "CI bot"},
    "sk-team-b": {"team_id": "team-b", "key_alias": "billing"},
    "sk-team-open": {"team_id": "Team Open", "team_metadata": {"cycles": {"client_levels": ["workspace"]}}},
    "sk-user": {"user_id": "alice@example.com"},
}


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    if api_key == MASTER_KEY:
        return UserAPIKeyAuth(
            api_key=api_key, user_role=LitellmUserRoles.PROXY_ADMIN, user_id="litellm_proxy_master_key"
        )
    fields = KEYS.get(api_key)
    if fields is None:
        raise HTTPException(status_code=401, detail="unknown key")
    return UserAPIKeyAuth(api_key=api_key, **fields)
