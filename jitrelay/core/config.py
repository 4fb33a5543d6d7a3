"""Relay configuration files: read a TOML file into a domain's ``RelayLogic`` overrides, and write one back.

The knobs a file may set are the fields of ``RelayLogic`` and nothing else,
found with ``dataclasses.fields``, so a knob added to the logic can be set
from a file at once. This module checks names and types and names the file
and the key when either is wrong; the logic itself checks values. Nothing
here touches a socket: reading the file is the only I/O.

A file holds keys for every domain at the top level and, optionally, one
table per domain (``[signal]``) whose keys win for that domain.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import re
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from jitrelay.core.domains import LOGICS, RelayLogic
from jitrelay.core.units import GiB, KiB, MiB

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with the package tomllib came from
    import tomli as tomllib

_UNITS = {"": 1, "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB}
_BYTE_COUNT = re.compile(r"\s*(\d+)\s*([a-zA-Z]*)\s*")
# Integer knobs that count bytes, and so also take "64KiB"-style strings: these and any field named *_size or *_bytes.
_BYTE_FIELDS = frozenset({"max_payload", "pending_high", "pending_low"})


class ConfigError(Exception):
    """A configuration file that cannot be read, or that names a knob or gives a value the relay cannot take."""


def parse_byte_count(text: str) -> int:
    """``4194304``, ``4MiB``, ``64k``: a non-negative number of bytes; ValueError for anything else."""
    match = _BYTE_COUNT.fullmatch(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte count: {text!r} (examples: 65536, 64KiB, 4MiB)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|min|h|d|w)\s*")
_SECONDS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``30min``, ``12h``, ``7d``, ``2w``: a positive number of seconds; ValueError for anything else."""
    match = _DURATION.fullmatch(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (examples: 90s, 30min, 12h, 7d, 2w)")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def parse_keep(text: str) -> tuple[int | None, float | None]:
    """``7d``, ``20GiB`` or ``7d,20GiB``: how much journal to keep, as (bytes, seconds); ValueError if neither.

    A duration ends in ``s``, ``min``, ``h``, ``d`` or ``w``; anything else must
    be a byte count (``parse_byte_count``: ``m`` there means MiB).
    """
    keep_bytes, keep_seconds = None, None
    for part in text.split(","):
        if _DURATION.fullmatch(part):
            keep_seconds = parse_duration(part)
            continue
        try:
            keep_bytes = parse_byte_count(part)
        except ValueError:
            raise ValueError(f"not a journal limit: {part!r} (an age such as 7d, a size such as 20GiB)") from None
        if keep_bytes == 0:
            raise ValueError("the journal cannot keep 0 bytes")
    return keep_bytes, keep_seconds


def read_config(path: Path, domain: str) -> dict[str, Any]:
    """The overrides the TOML file at ``path`` makes for ``domain``; the whole file is checked, every table."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return config_overrides(data, domain, str(path))


def config_overrides(data: Mapping[str, Any], domain: str, source: str) -> dict[str, Any]:
    """The overrides parsed TOML ``data`` makes for ``domain``: top-level keys, then the domain's table.

    ``source`` names the file in errors.
    """
    hints = _field_types(RelayLogic)
    common: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if key in LOGICS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {_wrong_type(key, 'a table', value)}")
            table_hints = _field_types(LOGICS[key])
            tables[key] = {k: _checked(k, v, table_hints, source, prefix=f"{key}.") for k, v in value.items()}
        elif key in hints:
            common[key] = _checked(key, value, hints, source)
        elif isinstance(value, dict):
            raise ConfigError(f"{source}: unknown table [{key}]; a table names a domain: {', '.join(LOGICS)}")
        else:
            raise ConfigError(f"{source}: unknown key {key!r}{_did_you_mean(key, hints)}")
    return {**common, **tables.get(domain, {})}


def build_logic(
    domain: str, file_overrides: Mapping[str, Any], flag_overrides: Mapping[str, Any], source: str | None = None
) -> RelayLogic:
    """The logic of ``domain``: its defaults, then the file's overrides, then the command line's.

    A value the logic rejects is a ``ConfigError``, prefixed with ``source``
    when the file alone already makes the logic invalid.
    """
    cls = LOGICS[domain]
    try:
        return cls(**{**file_overrides, **flag_overrides})
    except ValueError as exc:
        if source is not None and file_overrides:
            try:
                cls(**file_overrides)
            except ValueError as file_exc:
                raise ConfigError(f"{source}: {file_exc}") from file_exc
        raise ConfigError(str(exc)) from exc


def render_config(logic: RelayLogic) -> str:
    """``logic`` as TOML, every knob in one domain table; ``read_config`` turns it back into an equal logic.

    Knobs that are None are left out, as TOML has no null; so a knob whose
    default is not None (the execution relay's ``allowed_uids``) does not come
    back as None. No file or option can make it None, so ``jitrelay config``
    output always round-trips.
    """
    values = {}
    for f in dataclasses.fields(logic):
        value = getattr(logic, f.name)
        if value is None:
            continue
        values[f.name] = format_byte_count(value) if _is_byte_field(f.name) else _plain(value)
    header = (
        f"# jitrelay configuration of the {logic.name} relay.\n"
        "# Every knob is listed; knobs that are off (None, such as no metrics port) are left out.\n"
    )
    return header + tomli_w.dumps({logic.name: values})


def format_byte_count(count: int) -> str | int:
    """``4194304`` as ``"4MiB"``: the largest unit that divides it exactly, or the plain integer."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if count and count % size == 0:
            return f"{count // size}{unit}"
    return count


def _plain(value: object) -> object:
    """``value`` as TOML can hold it: tuples as arrays, paths as strings."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _field_types(cls: type[RelayLogic]) -> dict[str, Any]:
    """Each knob of ``cls`` and its type."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_byte_field(name: str) -> bool:
    return name in _BYTE_FIELDS or name.endswith(("_size", "_bytes"))


def _did_you_mean(key: str, hints: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(hints) + list(LOGICS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _checked(key: str, value: Any, hints: Mapping[str, Any], source: str, prefix: str = "") -> Any:
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {prefix + key!r}{_did_you_mean(key, hints)}")
    try:
        return _converted(value, hints[key], prefix + key, _is_byte_field(key))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _converted(value: Any, hint: Any, key: str, byte_size: bool) -> Any:
    """``value`` as a field of type ``hint`` holds it; ConfigError (without the file name) if it cannot be."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # an optional knob: TOML has no None, so a value is the inner type
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise ConfigError(f"{key!r} cannot be set from a file (type {hint})")
        return _converted(value, inner[0], key, byte_size)
    if origin is tuple:
        if not isinstance(value, list):
            raise _wrong_type(key, "an array", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_converted(v, args[0], f"{key}[{i}]", byte_size) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key!r} must be an array of {len(args)} items, not {len(value)}")
        return tuple(
            _converted(v, a, f"{key}[{i}]", byte_size) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _wrong_type(key, "a boolean", value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if byte_size and isinstance(value, str):
            try:
                return parse_byte_count(value)
            except ValueError as exc:
                raise ConfigError(f"{key!r}: {exc}") from None
        raise _wrong_type(key, 'an integer or a byte count such as "4MiB"' if byte_size else "an integer", value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if key.endswith("_seconds") and isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError as exc:
                raise ConfigError(f"{key!r}: {exc}") from None
        raise _wrong_type(key, 'a number or a duration such as "7d"' if key.endswith("_seconds") else "a number", value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _wrong_type(key, "a string", value)
    if isinstance(hint, type):  # Path, and any other type built from its text
        if not isinstance(value, str):
            raise _wrong_type(key, "a string", value)
        try:
            return hint(value)
        except ValueError as exc:
            raise ConfigError(f"{key!r}: {exc}") from None
    raise ConfigError(f"{key!r} cannot be set from a file (type {hint})")


def _wrong_type(key: str, wanted: str, value: Any) -> ConfigError:
    return ConfigError(f"{key!r} must be {wanted}, not {_toml_kind(value)}")


_TOML_KINDS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "a boolean"),  # before int: a bool is an int
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
    ((datetime.datetime, datetime.date, datetime.time), "a date-time"),
)


def _toml_kind(value: Any) -> str:
    """What TOML calls the type of a parsed value, with its article."""
    return next((kind for types, kind in _TOML_KINDS if isinstance(value, types)), type(value).__name__)
