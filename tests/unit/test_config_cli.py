"""budgets.yaml loading (errors name the line) and the `cycles` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cycles_ledger import ConfigError, Unit, open_ledger_sync
from cycles_ledger.cli import main
from cycles_ledger.config import load_budgets

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "budgets.yaml"
    p.write_text(text)
    return p


def test_shipped_budgets_file_loads() -> None:
    """configs/budgets.yaml is valid as shipped."""
    entries = load_budgets(ROOT / "configs/budgets.yaml")
    assert entries[0].scope == "tenant:acme" and entries[0].allocated.amount == 100 * 10**8
    assert entries[0].overdraft_limit == 5 * 10**8
    assert any(e.allocated.unit is Unit.TOKENS for e in entries)
    assert entries[0].period == {"every": "monthly", "tz": "UTC"} and entries[0].alerts == [50, 80, 100]
    assert entries[0].rate_limits == [
        {"amount": 50 * 10**8, "window_ms": 3_600_000, "on_exceed": "throttle", "alert_at": 80}
    ]


@pytest.mark.parametrize(
    ("body", "line", "needle"),
    [
        ("budgets:\n  - scope: tenant:a\n    allocated: 5usd\n  - scope: tenant:b c\n    allocated: 1usd\n", 4, "b c"),
        ("budgets:\n  - scope: tenant:a\n    allocated: -5usd\n", 2, "allocated"),
        ("budgets:\n  - scope: tenant:a\n    allocated: 1.5\n", 2, "allocated"),
        ("budgets:\n  - scope: tenant:a\n    allocated: 5\n", 2, "no unit"),
        ("budgets:\n  - scope: tenant:a\n    allocated: 5parsecs\n", 2, "unknown unit"),
        ("budgets:\n  - scope: tenant:a\n", 2, "missing `allocated`"),
        ("budgets:\n  - scope: tenant:a\n    allocated: 5usd\n    colour: red\n", 2, "colour"),
        (
            "budgets:\n  - scope: tenant:a\n    allocated: 5usd\n  - scope: tenant:a\n    allocated: 6usd\n",
            4,
            "already",
        ),
        ("budgets:\n  - scope: tenant:a\n    allocated: 5usd\n    overdraft_limit: 3tokens\n", 2, "overdraft"),
        ("budgets:\n  - scope: tenant:a\n    allocated: 5usd\n    unit: EUR\n", 2, "unknown unit"),
        ("budgets:\n  - scope: tenant:a\n    allocated: [5usd\n", 4, "YAML"),
        ("budget:\n  - scope: tenant:a\n", 1, "budgets"),
    ],
)
def test_config_errors_name_the_line(tmp_path: Path, body: str, line: int, needle: str) -> None:
    """Each mistake in a budgets file is a ConfigError that names file:line and the problem."""
    p = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_budgets(p)
    assert f"{p}:{line}" in str(info.value)
    assert needle in str(info.value)


def test_unit_key_allows_plain_numbers(tmp_path: Path) -> None:
    """With `unit:` given, a bare whole number is read in that unit."""
    p = write(tmp_path, "budgets:\n  - scope: tenant:a\n    unit: tokens\n    allocated: 5000\n")
    [e] = load_budgets(p)
    assert (e.allocated.unit, e.allocated.amount) == (Unit.TOKENS, 5000)


def cli(store: str, *args: str) -> int:
    return main(["--store", store, *args])


def test_cli_walkthrough(durable_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """apply, reserve, commit, deny, balances and events work end to end, on every store."""
    store = durable_url
    assert cli(store, "budgets", "apply", str(ROOT / "configs/budgets.yaml")) == 0
    capsys.readouterr()
    assert cli(store, "reserve", "tenant:acme/workflow:doc-processing", "12usd", "--json") == 0
    rid = json.loads(capsys.readouterr().out)["reservation_id"]
    assert cli(store, "commit", rid, "10usd") == 0
    assert "COMMITTED $10.00, released $2.00" in capsys.readouterr().out
    assert cli(store, "reserve", "tenant:acme/workflow:doc-processing", "25usd") == 1
    assert "BUDGET_EXCEEDED at tenant:acme/workflow:doc-processing (remaining $20.00)" in capsys.readouterr().out
    assert cli(store, "balances", "tenant:acme/workflow:doc-processing", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    usd = next(r for r in rows if r["unit"] == "USD_MICROCENTS")
    assert (usd["spent"], usd["remaining"]) == (10 * 10**8, 20 * 10**8)
    assert cli(store, "events", "--json") == 0
    types = [json.loads(line)["type"] for line in capsys.readouterr().out.splitlines()]
    assert types[:3] == ["denied", "committed", "reserved"]  # the newest first
    assert cli(store, "events", "--tail", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "time", "type", "scope", "amount", "model", "route", "call", "id", "reason"]
    assert len(lines) == 4 and "denied" in lines[2] and "committed" in lines[3]
    assert "cycles-cli" in lines[3] and "auto-" in lines[3]  # from its reservation: the action and the key
    assert cli(store, "verify") == 0


def test_cli_budget_ops_and_errors(durable_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """budget set/fund/freeze change the ledger; bad input exits 2 with the error code and changes nothing."""
    store = durable_url
    assert cli(store, "budget", "set", "tenant:x", "25usd", "--overdraft", "5usd") == 0
    assert cli(store, "budget", "fund", "tenant:x", "5usd") == 0
    assert cli(store, "budget", "freeze", "tenant:x") == 0
    capsys.readouterr()
    assert cli(store, "budget", "set", "tenant:x y", "25usd") == 2
    assert "INVALID_REQUEST" in capsys.readouterr().err
    assert cli(store, "budget", "set", "tenant:x", "--", "-3usd") == 2
    assert cli(store, "commit", "rsv_missing", "1usd") == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("budgets:\n  - scope: tenant:z\n    allocated: lots\n")
    assert cli(store, "budgets", "apply", str(bad)) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    with open_ledger_sync(store) as led:
        [b] = led.balances()
        assert (b.scope, b.allocated, b.status.value) == ("tenant:x", 30 * 10**8, "FROZEN")


def test_cli_store_from_environment(durable_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --store the CLI uses CYCLES_STORE, on every store."""
    url = durable_url
    monkeypatch.setenv("CYCLES_STORE", url)
    assert main(["budget", "set", "tenant:e", "1usd"]) == 0
    with open_ledger_sync(url) as led:
        assert led.balance("tenant:e").allocated == 10**8


def test_cli_reservations_and_sweep(durable_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`cycles reservations --status` lists what is held; release and sweep settle it."""
    store = durable_url
    assert cli(store, "budget", "set", "tenant:r", "5usd") == 0
    assert cli(store, "reserve", "tenant:r", "1usd", "--json") == 0
    assert cli(store, "reserve", "tenant:r", "2usd", "--json", "--ttl-ms", "1000") == 0
    capsys.readouterr()
    assert cli(store, "reservations", "--status", "ACTIVE", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["reserved"]["amount"] for r in rows) == [10**8, 2 * 10**8]
    first = next(r["reservation_id"] for r in rows if r["reserved"]["amount"] == 10**8)
    assert cli(store, "release", first, "--reason", "done") == 0
    assert "RELEASED $1.00" in capsys.readouterr().out
    assert cli(store, "reservations", "--status", "RELEASED") == 0
    assert first in capsys.readouterr().out
    assert cli(store, "sweep") == 0
    assert "expired 0 reservations" in capsys.readouterr().out


def test_cli_events_follow(durable_url: str) -> None:
    """`cycles events --follow` keeps printing events written by another process, on every store."""
    import select
    import subprocess
    import sys

    url = durable_url
    with open_ledger_sync(url) as led:
        led.set_budget("tenant:f", "1usd")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cycles_ledger.cli", "--store", url, "events", "--follow", "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["type"] == "budget_set"
        with open_ledger_sync(url) as led:
            led.fund("tenant:f", "2usd")
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "no new event printed within 20 s"
        event = json.loads(proc.stdout.readline())
        assert (event["type"], event["amount"], event["scope"]) == ("funded", 2 * 10**8, "tenant:f")
    finally:
        proc.kill()
        proc.communicate()


def test_cli_finds_the_proxys_settings_and_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI opens the store named in cycles.yaml (a relative SQLite path beside that file, wherever the
    command runs), the same file the proxy's settings resolve to; every command names its store; read
    commands never create a ledger."""
    from cycles_litellm.settings import load_settings

    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "cycles.yaml").write_text("store: sqlite:///ledger.db\nmode: shadow\n")
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("CYCLES_STORE", raising=False)
    monkeypatch.delenv("CYCLES_CONFIG", raising=False)
    expected = f"sqlite:///{conf / 'ledger.db'}"
    assert load_settings(beside=str(conf / "litellm.yaml")).store_url() == expected  # what the proxy opens

    assert main(["--config", str(conf / "cycles.yaml"), "balances"]) == 2  # nothing there yet: not created
    err = capsys.readouterr().err
    assert f"store: {expected} (store: of {conf / 'cycles.yaml'})" in err and "no ledger at" in err
    assert not (conf / "ledger.db").exists()

    assert main(["--config", str(conf / "cycles.yaml"), "reserve", "tenant:x", "1usd", "--dry-run"]) == 2
    assert not (conf / "ledger.db").exists()
    assert main(["--config", str(conf / "cycles.yaml"), "budget", "set", "tenant:x", "1usd"]) == 0
    assert (conf / "ledger.db").exists() and not list(elsewhere.iterdir())
    monkeypatch.setenv("CYCLES_CONFIG", str(conf / "cycles.yaml"))
    capsys.readouterr()
    assert main(["balances", "tenant:x"]) == 0
    out = capsys.readouterr()
    assert "tenant:x" in out.out and "$CYCLES_CONFIG" not in out.err and expected in out.err
    monkeypatch.setenv("CYCLES_CONFIG", str(conf / "missing.yaml"))
    assert main(["balances"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_refuses_memory_store(capsys: pytest.CaptureFixture[str]) -> None:
    """Each `cycles` command is a new process: a memory ledger would start empty every time."""
    assert cli("memory://", "balances") == 2
    assert "memory:// lives inside one process" in capsys.readouterr().err


def test_budgets_file_with_periods_rate_limits_and_alerts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """budgets.yaml sets periods, burn-rate limits and alerts; `cycles balances` shows them and the burn."""
    store = f"sqlite:///{tmp_path / 'l.db'}"
    path = tmp_path / "budgets.yaml"
    path.write_text(
        "budgets:\n"
        "  - scope: tenant:acme\n"
        "    allocated: 5000usd\n"
        "    period: {every: monthly, tz: Europe/Paris}\n"
        "    rate_limits: [{amount: 5usd, window: 10m, on_exceed: freeze, alert_at: 80%}]\n"
        "    alerts: [50%, 80%, 100%]\n"
        "  - scope: tenant:acme/agent:bot\n"
        "    allocated: 1000000tokens\n"
        "    period: daily\n"
    )
    assert cli(store, "budgets", "apply", str(path)) == 0
    assert cli(store, "reserve", "tenant:acme/agent:bot", "2usd") == 0
    capsys.readouterr()
    assert cli(store, "balances") == 0
    out = capsys.readouterr().out
    assert "monthly Europe/Paris (" in out and "$2.00/$5.00 per 10m freeze alert 80%" in out and "50%, 80%, 100%" in out
    assert "daily (" in out
    # Applying the file without them removes them: the file is the truth.
    path.write_text("budgets:\n  - scope: tenant:acme\n    allocated: 5000usd\n")
    assert cli(store, "budgets", "apply", str(path)) == 0
    capsys.readouterr()
    assert cli(store, "balances", "tenant:acme", "--json") == 0
    acme = next(b for b in json.loads(capsys.readouterr().out) if b["scope"] == "tenant:acme")
    assert (acme["period"], acme["rate_limits"], acme["alerts"]) == (None, None, None)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("    period: fortnightly\n", ":2: invalid period: period 'fortnightly' is not a duration"),
        ("    period: {every: daily, tz: Mars/Base}\n", ":2: invalid period: unknown time zone"),
        ("    rate_limits: [{amount: 5tokens, window: 1m}]\n", ":2: rate limit amount is in TOKENS"),
        ("    rate_limits: [{amount: 5usd}]\n", ":2: a rate limit needs a window"),
        ("    alerts: [0%]\n", ":2: alert threshold '0%' is not a percentage"),
        ("    rate_limits: [{amount: 5usd, window: 1m, alert_at: 120%}]\n", ":2: rate limit alert_at '120%' is not a"),
    ],
)
def test_budgets_file_time_errors_name_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str, message: str
) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text("budgets:\n  - scope: tenant:acme\n" + entry + "    allocated: 5usd\n")
    assert cli(f"sqlite:///{tmp_path / 'l.db'}", "budgets", "apply", str(path)) == 2
    assert message in capsys.readouterr().err
