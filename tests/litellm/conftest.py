"""LiteLLM reads its price map offline in tests, so prices are reproducible."""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
