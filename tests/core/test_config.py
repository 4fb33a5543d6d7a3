"""Relay configuration files: precedence, every error a file can hold, ``jitrelay config`` round trips, a real relay."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from support.reference import extended_record, message
from support.relays import StartRelay, relay_environ

from jitrelay.cli import build_parser, main
from jitrelay.core.config import (
    ConfigError,
    config_overrides,
    format_byte_count,
    parse_byte_count,
    read_config,
    render_config,
)
from jitrelay.core.domains import LOGICS, RelayLogic, logic_for
from jitrelay.core.units import KiB, MiB
from jitrelay.tools.relay_command import relay_logic

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

MARKET_DATA = 1
DOMAINS = list(LOGICS)


def logic_from(*argv: str) -> RelayLogic:
    """What ``jitrelay run ARGV`` would run, without running it."""
    return relay_logic(build_parser().parse_args(["run", *argv]))


def config_output(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["config", *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- precedence ----------------------------------------------------------------------------------------------------


PRECEDENCE_FILE = """
max_payload = "64KiB"
slow_timeout = 2.5
max_connections = 50
allowed_gids = [5]

[market_data]
max_connections = 60
pending_high = "16MiB"
"""


def test_flags_override_the_file_and_the_file_overrides_the_defaults(tmp_path: Path) -> None:
    relay_toml = write(tmp_path / "relay.toml", PRECEDENCE_FILE)
    market = logic_from("market_data", "--config", str(relay_toml), "--max-payload", "4KiB")
    assert market.max_payload == 4 * KiB  # flag over file
    assert market.slow_timeout == 2.5  # file over default
    assert market.max_connections == 60  # the domain's table over the file's top level
    assert (market.pending_high, market.pending_low) == (16 * MiB, 2 * MiB)  # table, and default
    assert market.checksum == "off" and market.slow_policy == "disconnect"  # defaults
    assert (market.allowed_uids, market.allowed_gids) == (None, (5,))

    signal = logic_from("signal", "--config", str(relay_toml))
    assert (signal.max_payload, signal.max_connections, signal.pending_high) == (64 * KiB, 50, 8 * MiB)
    assert signal.checksum == "if_set"  # the signal default, untouched by the file

    # --pending-limit sets both marks; --allow-uid/--allow-gid replace the whole access list.
    flagged = logic_from("market_data", "--config", str(relay_toml), "--pending-limit", "1MiB", "--allow-uid", "7")
    assert (flagged.pending_high, flagged.pending_low) == (1 * MiB, 256 * KiB)
    assert (flagged.allowed_uids, flagged.allowed_gids) == ((7,), ())
    assert logic_from("market_data", "--config", str(relay_toml), "--metrics-port", "9187").metrics_port == 9187


def test_without_a_file_the_defaults_and_flags_apply() -> None:
    assert logic_from("execution") == logic_for("execution")
    assert logic_from("execution", "--no-journal", "--max-connections", "3") == logic_for(
        "execution", journal=False, max_connections=3
    )


def test_a_value_the_flags_make_invalid_is_not_blamed_on_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path / "good.toml", 'max_payload = "64KiB"\n')
    assert main(["config", "market_data", "--config", str(good), "--pending-limit", "0"]) == 2
    assert capsys.readouterr().err == "jitrelay config: error: need 0 < pending_low <= pending_high\n"
    # A file invalid on its own is named, unless the flags replace what made it invalid.
    low = write(tmp_path / "low.toml", 'pending_low = "64MiB"\n')
    assert main(["config", "market_data", "--config", str(low)]) == 2
    assert capsys.readouterr().err == f"jitrelay config: error: {low}: need 0 < pending_low <= pending_high\n"
    assert logic_from("market_data", "--config", str(low), "--pending-limit", "1GiB").pending_low == 256 * MiB


# --- errors --------------------------------------------------------------------------------------------------------


BAD_FILES = [
    # unknown names
    ("max_paylod = 1", "unknown key 'max_paylod' (did you mean 'max_payload'?)"),
    ("colour = 'blue'", "unknown key 'colour'"),
    ('[signal]\nslow_polcy = "block"', "unknown key 'signal.slow_polcy' (did you mean 'slow_policy'?)"),
    ("[fx]\nmax_payload = 1", "unknown table [fx]; a table names a domain: market_data, signal, execution, system"),
    ("signal = 5", "'signal' must be a table, not an integer"),
    # wrong types, one or more per kind of knob
    ("vendor_types = 1", "'vendor_types' must be a boolean, not an integer"),
    ('versions = "1,2"', "'versions' must be an array, not a string"),
    ('journal = "yes"', "'journal' must be a boolean, not a string"),
    ("[market_data]\njournal = {}", "'market_data.journal' must be a boolean, not a table"),
    ('max_connections = "5000"', "'max_connections' must be an integer, not a string"),
    ("max_connections = 1.5", "'max_connections' must be an integer, not a float"),
    ("max_payload = true", "'max_payload' must be an integer or a byte count such as \"4MiB\", not a boolean"),
    ('max_payload = "4 parsecs"', "'max_payload': not a byte count: '4 parsecs' (examples: 65536, 64KiB, 4MiB)"),
    ("buffer_size = 1e6", "'buffer_size' must be an integer or a byte count such as \"4MiB\", not a float"),
    (
        'journal_rotate_bytes = "1.5G"',
        "'journal_rotate_bytes': not a byte count: '1.5G' (examples: 65536, 64KiB, 4MiB)",
    ),
    ('slow_timeout = "1s"', "'slow_timeout' must be a number, not a string"),
    ("slow_timeout = false", "'slow_timeout' must be a number, not a boolean"),
    ("slow_policy = 1", "'slow_policy' must be a string, not an integer"),
    ('socket_path = ["a.sock"]', "'socket_path' must be a string, not an array"),
    ("journal_dir = 1979-05-27", "'journal_dir' must be a string, not a date-time"),
    ("allowed_uids = 1000", "'allowed_uids' must be an array, not an integer"),
    ('allowed_uids = [1000, "root"]', "'allowed_uids[1]' must be an integer, not a string"),
    ("allowed_gids = [true]", "'allowed_gids[0]' must be an integer, not a boolean"),
    ("tlv_ranges = [1, 19]", "'tlv_ranges[0]' must be an array, not an integer"),
    ("tlv_ranges = [[1, 19, 20]]", "'tlv_ranges[0]' must be an array of 2 items, not 3"),
    ('tlv_ranges = [[1, "19"]]', "'tlv_ranges[0][1]' must be an integer, not a string"),
    ('metrics_port = "9100"', "'metrics_port' must be an integer, not a string"),
    # the right type, but a value the logic refuses
    ('slow_policy = "sometimes"', "slow_policy must be one of ('disconnect', 'block'), not 'sometimes'"),
    ('journal_fsync = "hourly"', "journal_fsync must be one of ('every', 'batch', 'none'), not 'hourly'"),
    ("tlv_ranges = [[0, 19]]", "TLV range 0..19 is not within 1..255"),
    ("metrics_port = 70000", "metrics_port must be a TCP port (0..65535), not 70000"),
    ("[market_data]\nmax_connections = 0", "max_connections must be at least 1"),
    ("slow_timeout = 0", "slow_timeout must be positive"),
    ('max_payload = "4GiB"', "max_payload must fit in 32 bits"),
    (
        'journal_keep_seconds = "7 days"',
        "'journal_keep_seconds': not a duration: '7 days' (examples: 90s, 30min, 12h, 7d, 2w)",
    ),
    (
        "journal_keep_seconds = true",
        "'journal_keep_seconds' must be a number or a duration such as \"7d\", not a boolean",
    ),
    ("journal_keep_seconds = 0", "journal_keep_seconds must be positive, not 0.0"),
    ("journal_keep_bytes = 0", "journal_keep_bytes must be positive, not 0"),
]


@pytest.mark.parametrize(("text", "error"), BAD_FILES, ids=[error for _, error in BAD_FILES])
def test_each_bad_key_and_type_is_an_error_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, error: str
) -> None:
    relay_toml = write(tmp_path / "relay.toml", text + "\n")
    assert main(["config", "market_data", "--config", str(relay_toml)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"jitrelay config: error: {relay_toml}: {error}\n"
    assert captured.out == ""


def test_tables_of_other_domains_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"^relay.toml: 'execution.journal' must be a boolean, not an integer$"):
        config_overrides({"execution": {"journal": 1}}, "market_data", "relay.toml")


def test_unreadable_and_malformed_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.toml"
    assert main(["config", "signal", "--config", str(missing)]) == 2
    assert capsys.readouterr().err == f"jitrelay config: error: {missing}: cannot read: No such file or directory\n"
    broken = write(tmp_path / "broken.toml", "max_payload = 1\nmax_payload = 2\n")
    assert main(["config", "signal", "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jitrelay config: error: {broken}: not valid TOML: ") and "line 2" in err
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'socket_path = "/tmp/r\xe9lais.sock"\n')
    assert main(["config", "signal", "--config", str(latin1)]) == 2
    assert capsys.readouterr().err.startswith(f"jitrelay config: error: {latin1}: not valid TOML: 'utf-8' codec")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("max_paylod = 1024", "unknown key 'max_paylod' (did you mean 'max_payload'?)"),
        ("max_payload = true", "'max_payload' must be an integer or a byte count such as \"4MiB\", not a boolean"),
    ],
)
def test_run_with_a_bad_file_exits_2_and_never_listens(short_dir: Path, text: str, error: str) -> None:
    socket_path = short_dir / "relay.sock"
    relay_toml = write(short_dir / "relay.toml", f'socket_path = "{socket_path}"\n{text}\n')
    result = subprocess.run(
        [sys.executable, "-m", "jitrelay", "run", "market_data", "--config", str(relay_toml)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**relay_environ(), "JITRELAY_SOCKET_DIR": str(short_dir)},
    )
    assert result.returncode == 2
    assert result.stderr == f"jitrelay run: error: {relay_toml}: {error}\n"
    assert sorted(p.name for p in short_dir.iterdir()) == ["relay.toml"]


# --- byte counts ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count"), [("65536", 65536), ("64KiB", 65536), ("64k", 65536), (" 4 MiB ", 4 * MiB), ("2GiB", 2 << 30)]
)
def test_byte_counts(text: str, count: int) -> None:
    assert parse_byte_count(text) == count


@pytest.mark.parametrize("text", ["", "-1", "1.5MiB", "4MB", "MiB", "4 Mi B"])
def test_byte_counts_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a byte count"):
        parse_byte_count(text)


@pytest.mark.parametrize(
    ("count", "written"), [(0, 0), (1, 1), (1024, "1KiB"), (1536, 1536), (3 * MiB, "3MiB"), (5 << 30, "5GiB")]
)
def test_byte_counts_written_back(count: int, written: str | int) -> None:
    assert format_byte_count(count) == written
    assert parse_byte_count(str(written)) == count


# --- jitrelay config -----------------------------------------------------------------------------------------------


def changed(domain: str) -> RelayLogic:
    """The domain's logic with every knob set to something other than its default."""
    default = logic_for(domain)
    hints = typing.get_type_hints(type(default))
    values: dict[str, object] = {
        "tlv_ranges": ((1, 5), (40, 41)),
        "versions": (1, 7),
        "checksum": "required" if default.checksum != "required" else "off",
        "max_payload": 5000,
        "slow_policy": "block" if default.slow_policy == "disconnect" else "disconnect",
        "pending_high": 3 * MiB,
        "pending_low": 3 * KiB,
        "slow_timeout": 0.25,
        "read_path": "python",
        "buffer_size": 3 * MiB + 5,
        "socket_path": Path("/tmp/jr-config/relay.sock"),
        "allowed_uids": (0, 4242),
        "allowed_gids": (7, 8),
        "max_connections": 17,
        "journal_dir": Path("/tmp/jr-config/journal"),
        "journal_fsync": "every",
        "journal_rotate_bytes": 1536,
        "journal_on_error": "forward" if default.journal_on_error == "pause" else "pause",
        "metrics_port": 9187,
        "listen": ("tcp://127.0.0.1:7001", "tcp://[::1]:7002", "tls://0.0.0.0:7443"),
        "allowed_networks": ("10.0.0.0/8",),
        "allowed_names": ("oms.prod", "spiffe://prod/bridge"),
    }
    knobs = {f.name for f in dataclasses.fields(default)}
    values = {name: value for name, value in values.items() if name in knobs}
    for f in dataclasses.fields(default):  # knobs without a value above get one by type
        if f.name not in values:
            old, hint = getattr(default, f.name), hints[f.name]
            inner = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
            if inner is bool:
                values[f.name] = not old
            elif inner in (int, float):
                values[f.name] = inner((old or 0) + 3)
            elif inner is Path:
                values[f.name] = Path(f"/tmp/jr-config/{f.name}")
            else:
                raise AssertionError(f"give the new knob {f.name!r} a changed value here")
    logic = logic_for(domain, **values)
    unchanged = [f.name for f in dataclasses.fields(logic) if getattr(logic, f.name) == getattr(default, f.name)]
    assert unchanged == []
    return logic


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_knob_round_trips_through_a_file(tmp_path: Path, domain: str) -> None:
    logic = changed(domain)
    relay_toml = write(tmp_path / "relay.toml", render_config(logic))
    assert read_config(relay_toml, domain) == {f.name: getattr(logic, f.name) for f in dataclasses.fields(logic)}
    assert logic_from(domain, "--config", str(relay_toml)) == logic


@pytest.mark.parametrize("domain", DOMAINS)
def test_config_prints_what_run_would_use_and_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], domain: str
) -> None:
    relay_toml = write(tmp_path / "relay.toml", PRECEDENCE_FILE)
    argv = [domain, "--config", str(relay_toml), "--max-payload", "4KiB", "--socket", "/tmp/jr-config/x.sock"]
    printed = config_output(capsys, *argv)
    assert printed.startswith(f"# jitrelay configuration of the {domain} relay.\n")
    parsed = tomllib.loads(printed)
    assert list(parsed) == [domain]
    assert parsed[domain]["max_payload"] == "4KiB" and parsed[domain]["socket_path"] == "/tmp/jr-config/x.sock"
    assert "metrics_port" not in parsed[domain]  # None is left out
    expected = logic_from(*argv)
    again = write(tmp_path / "again.toml", printed)
    assert logic_from(domain, "--config", str(again)) == expected
    assert config_output(capsys, domain, "--config", str(again)) == printed


def test_config_outputs_of_every_domain_make_one_file(tmp_path: Path) -> None:
    every = "\n".join(render_config(changed(domain)) for domain in DOMAINS)
    relay_toml = write(tmp_path / "relay.toml", every)
    for domain in DOMAINS:
        assert logic_from(domain, "--config", str(relay_toml)) == changed(domain)


def test_config_command_as_a_process(short_dir: Path) -> None:
    relay_toml = write(short_dir / "relay.toml", "[signal]\nmax_payload = 1000\n")
    result = subprocess.run(
        [sys.executable, "-m", "jitrelay", "config", "signal", "--config", str(relay_toml), "--metrics-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**relay_environ(), "JITRELAY_SOCKET_DIR": str(short_dir)},
    )
    assert result.returncode == 0, result.stderr
    table = tomllib.loads(result.stdout)["signal"]
    assert (table["max_payload"], table["metrics_port"]) == (1000, 0)
    assert table["socket_path"] == str(short_dir / "signal.sock")
    assert not (short_dir / "signal.sock").exists()


# --- a real relay --------------------------------------------------------------------------------------------------


def test_a_relay_runs_with_its_file_and_flags_override_it(start_relay: StartRelay, short_dir: Path) -> None:
    socket_path = short_dir / "from-file.sock"
    relay_toml = write(short_dir / "relay.toml", f'socket_path = "{socket_path}"\nmax_payload = "1KiB"\n')
    # The file puts the socket where no flag or default would, and the flag raises its 1 KiB limit to 2 KiB.
    relay = start_relay(
        "market_data", "--config", str(relay_toml), "--max-payload", "2KiB", socket_path=socket_path, pass_socket=False
    )
    fits = message(MARKET_DATA, extended_record(1, bytes(range(250)) * 6), sequence=1)  # 1505-byte payload
    too_big = message(MARKET_DATA, extended_record(1, bytes(3000)), sequence=2)  # 3005 bytes
    with relay.connect() as subscriber, relay.connect() as publisher:
        publisher.sendall(fits)
        got = b""
        while len(got) < len(fits):
            chunk = subscriber.recv(65536)
            assert chunk, "the relay closed the subscriber"
            got += chunk
        assert got == fits
        publisher.sendall(too_big)
        relay.wait_line("oversize at stream offset 1537", timeout=30)
        assert closed(publisher)
        subscriber.settimeout(0.5)
        with pytest.raises(TimeoutError):
            subscriber.recv(1)


def closed(sock: socket.socket) -> bool:
    """Whether the relay has closed this connection."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_the_documented_example_file_is_valid(tmp_path: Path) -> None:
    operations = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    section = operations.split("## Configuration file", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    relay_toml = write(tmp_path / "relay.toml", example)
    execution = logic_from("execution", "--config", str(relay_toml))
    assert execution.socket_path == Path("/run/trading/execution.sock")
    assert (execution.pending_high, execution.pending_low, execution.allowed_uids) == (16 * MiB, 4 * MiB, (1001, 1002))
    assert logic_from("market_data", "--config", str(relay_toml)).max_payload == 256 * KiB


# --- journal retention ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "keep_bytes", "keep_seconds"),
    [
        ("7d", None, 7 * 86400.0),
        ("20GiB", 20 * 1024**3, None),
        ("12h,512MiB", 512 * MiB, 12 * 3600.0),
        ("4m,90s", 4 * MiB, 90.0),  # "m" is a byte unit, as everywhere; minutes are "min"
        ("1.5min", None, 90.0),
        ("2w", None, 14 * 86400.0),
    ],
)
def test_journal_keep_takes_an_age_a_size_or_both(
    value: str, keep_bytes: int | None, keep_seconds: float | None
) -> None:
    logic = logic_from("execution", "--journal-keep", value)
    assert (logic.journal_keep_bytes, logic.journal_keep_seconds) == (keep_bytes, keep_seconds)


@pytest.mark.parametrize("value", ["", "7days", "0", "0s", "-1d", "7d,", "1.5GiB"])
def test_journal_keep_refuses_what_is_neither(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        logic_from("execution", "--journal-keep", value)
    assert exit_info.value.code == 2
    assert "--journal-keep" in capsys.readouterr().err


def test_journal_keep_in_a_file_takes_a_duration_text_and_prints_back_as_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    relay_toml = write(tmp_path / "relay.toml", 'journal_keep_seconds = "7d"\njournal_keep_bytes = "20GiB"\n')
    logic = logic_from("execution", "--config", str(relay_toml))
    assert (logic.journal_keep_bytes, logic.journal_keep_seconds) == (20 * 1024**3, 7 * 86400.0)
    printed = tomllib.loads(config_output(capsys, "execution", "--config", str(relay_toml)))["execution"]
    assert (printed["journal_keep_bytes"], printed["journal_keep_seconds"]) == ("20GiB", 604800.0)
    flags = logic_from("execution", "--config", str(relay_toml), "--journal-keep", "1d")
    assert (flags.journal_keep_bytes, flags.journal_keep_seconds) == (20 * 1024**3, 86400.0)  # the flag sets only age
