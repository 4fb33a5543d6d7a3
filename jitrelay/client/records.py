"""Typed records for the clients: subscribe to numpy columns, publish from them.

A subscriber's ``record_batches("trade")`` turns each batch it receives into
a ``RecordBatch`` with one compiled call (``kernels.records.decode``);
``records("trade")`` hands out the records one by one. A publisher's
``publish_records(array)`` writes a whole structured array as messages with
one compiled call per chunk (``kernels.records.encode``);
``publish_record("trade", price=..., ...)`` builds one from field values.
The layouts are Torq's (``core.records``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import numpy as np

from jitrelay.core import fixed_point, instruments
from jitrelay.core.records import RecordLayout, layout
from jitrelay.kernels import records as record_kernels

if TYPE_CHECKING:
    import pandas

log = logging.getLogger("jitrelay.client")

ENCODE_CHUNK = 64 * 1024  # records encoded per compiled call when publishing: ~5 MiB of trades, reused


class RecordBatch:
    """The records of one type in one received batch, as columns: ``records`` and the header fields beside them.

    ``records`` is a structured array of the layout's dtype (Torq's field
    names, integers exactly as on the wire); ``sequence``, ``timestamp_ns``
    and ``source`` hold the header fields of the message each record came in.
    """

    def __init__(self, kind: RecordLayout, columns: record_kernels.Columns) -> None:
        self.layout = kind
        self.records = columns.records
        self.sequence = columns.sequence
        self.timestamp_ns = columns.timestamp_ns
        self.source = columns.source
        self.wrong_size = columns.wrong_size

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[np.void]:
        return iter(self.records)

    def to_pandas(self) -> pandas.DataFrame:
        """A DataFrame: the header fields, then every scalar field by Torq's name (padding and arrays left out).

        Fixed-point fields stay the wire's integers; ``core.fixed_point.to_float`` scales a column for plotting.
        Needs pandas (the ``pandas`` extra): ``ImportError`` says so otherwise.
        """
        try:
            import pandas
        except ImportError as error:
            raise ImportError("RecordBatch.to_pandas needs pandas: pip install 'jitrelay[pandas]'") from error
        columns: dict[str, Any] = {
            "sequence": self.sequence,
            "timestamp_ns": self.timestamp_ns,
            "source": self.source,
        }
        fields: dict[str, Any] = dict(self.layout.dtype.fields or {})
        for name, (dtype, *_) in fields.items():
            if dtype.shape or dtype.fields or name.startswith("_") or name == "reserved":
                continue
            columns[name] = np.ascontiguousarray(self.records[name])
        return pandas.DataFrame(columns)


class RecordReader:
    """``record_batches`` and ``records`` for a blocking subscriber (anything with ``batches()``)."""

    if TYPE_CHECKING:

        def batches(self) -> Iterator[np.ndarray]: ...  # the subscriber's own

    def record_batches(self, record: int | str | RecordLayout) -> Iterator[RecordBatch]:
        """Each received batch's records of type ``record`` as one ``RecordBatch`` (batches without any skipped).

        ``record`` is a type number, name (``"trade"``) or Torq struct name
        (``"TradeTLV"``); ``UnknownRecord`` for one without a layout. Records of
        the type with another length are left out, counted in ``wrong_size``
        and logged once.
        """
        kind = layout(record)
        warned = False
        for batch in self.batches():
            found = RecordBatch(kind, record_kernels.decode(batch, kind))
            warned = _warn_wrong_size(found, warned)
            if len(found):
                yield found

    def records(self, record: int | str | RecordLayout) -> Iterator[np.void]:
        """Each record of type ``record`` as it arrives, one structured scalar at a time (``trade["price"]``)."""
        for found in self.record_batches(record):
            yield from found.records


class AsyncRecordReader:
    """``record_batches`` and ``records`` for the asyncio subscriber."""

    if TYPE_CHECKING:

        def batches(self) -> AsyncIterator[np.ndarray]: ...  # the subscriber's own

    async def record_batches(self, record: int | str | RecordLayout) -> AsyncIterator[RecordBatch]:
        """Each received batch's records of type ``record`` as one ``RecordBatch``; see ``RecordReader``."""
        kind = layout(record)
        warned = False
        async for batch in self.batches():
            found = RecordBatch(kind, record_kernels.decode(batch, kind))
            warned = _warn_wrong_size(found, warned)
            if len(found):
                yield found

    async def records(self, record: int | str | RecordLayout) -> AsyncIterator[np.void]:
        """Each record of type ``record`` as it arrives."""
        async for found in self.record_batches(record):
            for one in found.records:
                yield one


def _warn_wrong_size(found: RecordBatch, warned: bool) -> bool:
    if found.wrong_size and not warned:
        log.warning(
            "%d %s record(s) with a length other than %d bytes left out (and any more from now on are too)",
            found.wrong_size,
            found.layout.name,
            found.layout.size,
        )
        return True
    return warned


def build_record(record: int | str | RecordLayout, **fields: Any) -> np.ndarray:
    """One record as a one-element structured array, from field values by Torq's names; unnamed fields are 0.

    Fixed-point fields (prices, sizes, USD amounts) take a ``Decimal``,
    ``float`` or ``str`` as the decimal it stands for, and an ``int`` as the
    wire's integer. ``asset_id`` takes a symbol (``"BTCUSD"``), venue fields
    a venue name (``"Kraken"``), ``asset_type`` a name (``"Coin"``), ``side``
    ``"buy"``/``"sell"``. Raises ``ValueError`` for a field the layout lacks.
    """
    kind = layout(record)
    one = np.zeros(1, dtype=kind.dtype)
    names = kind.dtype.names or ()
    for name, value in fields.items():
        if name not in names:
            raise ValueError(f"the {kind.name} record has no field {name!r}; its fields: {', '.join(names)}")
        one[name] = _wire_value(kind, name, value)
    return one


def _wire_value(kind: RecordLayout, name: str, value: Any) -> Any:
    """A field value as the wire's integer: decimals scaled, names looked up."""
    if name in kind.fixed_point and isinstance(value, Decimal | float | str):
        return fixed_point.to_fixed(value)
    if isinstance(value, str):
        if name == "asset_id":
            return instruments.symbol_asset_id(value)
        if name in ("venue_id", "venue", "source_venue", "target_venue"):
            return instruments.venue_id(value)
        if name == "asset_type":
            return instruments.asset_type_id(value)
        if name == "side":
            sides = {side: number for number, side in instruments.SIDES.items()}
            if value not in sides:
                raise ValueError(f"side must be buy or sell, not {value!r}")
            return sides[value]
    return value


class _Publishing:
    """What encoding records needs of a publisher: its header fields and sequence counter (``Encoder``'s)."""

    domain_id: int
    source: int
    version: int
    next_sequence: int
    checksum: bool

    def _encode_records(self, chunk: np.ndarray, record: Any, stamps: Any, out: np.ndarray | None) -> np.ndarray:
        data = record_kernels.encode(
            chunk,
            domain=self.domain_id,
            source=self.source,
            version=self.version,
            first_sequence=self.next_sequence,
            timestamp_ns=stamps,
            checksums=self.checksum,
            record=record,
            out=out,
        )
        self.next_sequence = (self.next_sequence + len(chunk)) & 0xFFFF_FFFF_FFFF_FFFF
        return data


class RecordWriter(_Publishing):
    """``publish_records`` and ``publish_record`` for a blocking publisher."""

    if TYPE_CHECKING:  # the publisher's own

        def publish_batch(self, buffer: Any) -> None: ...
        def publish(
            self,
            records: Iterable[tuple[int, bytes]] = (),
            *,
            flags: int = 0,
            sequence: int | None = None,
            timestamp_ns: int | None = None,
        ) -> int: ...

    def publish_records(
        self, records: np.ndarray, record: int | str | RecordLayout | None = None, *, timestamp_ns: Any = None
    ) -> int:
        """Publish each element of a layout's structured array as one message; return the first's sequence.

        Encoded ``ENCODE_CHUNK`` records per compiled call into one reused
        buffer (this publisher writes each chunk out before it returns).
        ``timestamp_ns``: one value for every header, an array of one per
        record, or now (per chunk). The checksum follows the publisher's.
        """
        first = self.next_sequence
        out: np.ndarray | None = None
        for start in range(0, len(records), ENCODE_CHUNK):
            chunk = records[start : start + ENCODE_CHUNK]
            if out is None:
                size = record_kernels.message_size(record_kernels.layout_of(chunk, record))
                out = np.empty(len(chunk) * size, dtype=np.uint8)
            self.publish_batch(self._encode_records(chunk, record, _stamps_for(timestamp_ns, start, len(chunk)), out))
        return first

    def publish_record(self, record: int | str | RecordLayout, value: np.ndarray | None = None, **fields: Any) -> int:
        """Publish one record, from a dtype scalar or one-element array (``value``) or field values (see
        ``build_record``). Returns its sequence number.
        """
        return self.publish([_one_record(record, value, fields)])


class AsyncRecordWriter(_Publishing):
    """``publish_records`` and ``publish_record`` for the asyncio publisher (each chunk a fresh buffer, which
    the transport may still hold after the write is awaited)."""

    if TYPE_CHECKING:  # the publisher's own

        async def publish_batch(self, buffer: Any) -> None: ...
        async def publish(
            self,
            records: Iterable[tuple[int, bytes]] = (),
            *,
            flags: int = 0,
            sequence: int | None = None,
            timestamp_ns: int | None = None,
        ) -> int: ...

    async def publish_records(
        self, records: np.ndarray, record: int | str | RecordLayout | None = None, *, timestamp_ns: Any = None
    ) -> int:
        """``RecordWriter.publish_records``, awaiting each chunk's write."""
        first = self.next_sequence
        for start in range(0, len(records), ENCODE_CHUNK):
            chunk = records[start : start + ENCODE_CHUNK]
            stamps = _stamps_for(timestamp_ns, start, len(chunk))
            await self.publish_batch(self._encode_records(chunk, record, stamps, None))
        return first

    async def publish_record(
        self, record: int | str | RecordLayout, value: np.ndarray | None = None, **fields: Any
    ) -> int:
        """``RecordWriter.publish_record``, awaited."""
        return await self.publish([_one_record(record, value, fields)])


def _one_record(
    record: int | str | RecordLayout, value: np.ndarray | None, fields: dict[str, Any]
) -> tuple[int, bytes]:
    kind = layout(record)
    one = build_record(kind, **fields) if value is None else np.asarray(value, dtype=kind.dtype).reshape(1)
    return kind.tlv_type, one.tobytes()


def _stamps_for(timestamp_ns: Any, start: int, count: int) -> Any:
    """The chunk's share of per-record timestamps; a single value or None as it is."""
    if isinstance(timestamp_ns, np.ndarray):
        return timestamp_ns[start : start + count]
    return timestamp_ns
