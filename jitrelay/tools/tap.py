"""How ``jitrelay sub`` and ``jitrelay audit`` show a message: one line of text or one JSON object.

Pure: formatting and filtering only, so the tap's output can be tested without
a relay and stays the same wherever a message comes from.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import dataclass

from jitrelay.core import protocol
from jitrelay.core.record_text import describe_record, record_fields


def type_name(tlv_type: int) -> str:
    """``trade`` for a known type, ``type17`` for one without a name."""
    return protocol.TLV_TYPE_NAMES.get(tlv_type, f"type{tlv_type}")


def header_time(timestamp_ns: int) -> str:
    """The header timestamp as ISO-8601 UTC with all nine digits of nanoseconds."""
    seconds, nanos = divmod(timestamp_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


def format_message(message: protocol.Message, names: bool = False) -> str:
    """One line: header time (UTC), domain, source, sequence, size, then each record.

    A record Torq gives a layout (of its length) is shown by field
    (``trade asset=BTC price=57342.10000000 ...``, see ``core.record_text``);
    any other as type:hexvalue, its type by name with ``names``
    (``type17:01ab``), so a person reading a tap need not know the numbers.
    """
    head = message.header
    domain = protocol.DOMAIN_NAMES.get(head.relay_domain, str(head.relay_domain))
    records = " ".join(
        describe_record(tlv_type, value) or f"{type_name(tlv_type) if names else tlv_type}:{value.hex()}"
        for tlv_type, value in message.records
    )
    stamp = header_time(head.timestamp_ns)
    return f"{stamp} {domain} source={head.source} seq={head.sequence} size={len(message.raw)} {records}".rstrip()


def message_fields(message: protocol.Message, names: bool = False) -> dict[str, object]:
    """Every header field, the header time as text, the records, and whether the checksum holds.

    Each record has its type, its value in hex and, when Torq gives its type
    a layout of its length, its name and ``fields``: every field by Torq's
    name with the integer exactly as on the wire (``core.record_text``).
    """
    head = message.header
    fields: dict[str, object] = {name: getattr(head, name) for name in protocol.HEADER_FIELDS}
    fields["time"] = header_time(head.timestamp_ns)
    fields["domain"] = protocol.DOMAIN_NAMES.get(head.relay_domain, str(head.relay_domain))
    fields["records"] = [_record_json(t, v, names) for t, v in message.records]
    fields["checksum_ok"] = message.checksum_ok
    return fields


def _record_json(tlv_type: int, value: bytes, names: bool) -> dict[str, object]:
    decoded = record_fields(tlv_type, value)
    shown: dict[str, object] = {"type": tlv_type}
    if names or decoded is not None:
        shown["name"] = type_name(tlv_type)
    if decoded is not None:
        shown["fields"] = decoded
    shown["value_hex"] = value.hex()
    return shown


def message_json(message: protocol.Message, names: bool = False) -> str:
    """``message_fields`` as one line of JSON."""
    return json.dumps(message_fields(message, names))


@dataclass(frozen=True)
class MessageFilter:
    """Which messages a tap shows: any of ``types`` among its records, and its source in ``sources``.

    ``None`` lets everything through on that count.
    """

    types: Collection[int] | None = None
    sources: Collection[int] | None = None

    @property
    def active(self) -> bool:
        return self.types is not None or self.sources is not None

    def keeps(self, message: protocol.Message) -> bool:
        if self.sources is not None and message.header.source not in self.sources:
            return False
        return self.types is None or any(tlv_type in self.types for tlv_type, _ in message.records)
