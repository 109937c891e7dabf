"""README's rollout steps work as written: the bash block between `<!-- rollout -->` markers runs, from a
fresh copy of configs/, against the fake provider and a real proxy, and does what its comments say."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from cycles_litellm.launch import REPO_ROOT, free_port


def readme_block() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"<!-- rollout -->\n```bash\n(.*?)```\n<!-- /rollout -->", text, re.S)
    assert match, "README lost its rollout block"
    return match.group(1)


def test_the_readme_rollout_steps_run_as_written(tmp_path: Path) -> None:
    shutil.copytree(REPO_ROOT / "configs", tmp_path / "configs")
    (tmp_path / ".venv").symlink_to(REPO_ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYCLES_")}
    env |= {
        "PROVIDER_PORT": str(free_port()),
        "PROXY_PORT": str(free_port()),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "PYTHONPATH": str(REPO_ROOT),
    }
    done = subprocess.run(
        ["bash", "-c", readme_block()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    codes = [line for line in done.stdout.splitlines() if re.fullmatch(r"\d{3}", line)]
    assert codes == ["200", "200", "200", "402"], done.stdout
    assert "would_deny" in done.stdout and "BUDGET_NOT_FOUND" in done.stdout
    assert "tenant:acme" in done.stdout and (tmp_path / "configs" / "cycles.db").exists()
    assert "mode: enforce" in (tmp_path / "configs" / "cycles.yaml").read_text()
