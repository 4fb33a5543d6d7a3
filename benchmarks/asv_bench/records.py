"""Typed records: ``records.decode`` and ``records.encode`` of a 1 MiB batch of Torq trades, against ``struct``.

The batch is ``jitrelay bench --workloads records``' (``common.trade_fixture``):
14,169 trade messages of 74 bytes. ``time_*`` times one call; ``track_*``
gives records per second and the ratio to the Python ``struct`` loop over the
same bytes, timed in alternation. The record modules are reached through
``common`` only, so the suite still imports at commits that predate them.
"""

from __future__ import annotations

from . import common


class DecodeTrades:
    """One ``records.decode(batch, "trade")``: the strided view of a uniform batch, or (``copy``) a contiguous copy."""

    param_names = ["copy"]
    params = [[False, True]]
    repeat = (10, 200, 1.0)

    def setup(self, copy):
        self.f = common.trade_fixture()

    def time_decode(self, copy):
        common.decode_trades(self.f, copy)

    def track_records_per_second(self, copy):
        return len(self.f.trades) / common.best_time(lambda: common.decode_trades(self.f, copy))

    track_records_per_second.unit = "records/s"

    def track_ratio_to_struct(self, copy):
        """Above 1: faster than ``struct.unpack_from`` per message in Python."""
        return common.speed_ratio(
            lambda: common.decode_trades(self.f, copy), lambda: common.struct_decode_trades(self.f), rounds=3
        )

    track_ratio_to_struct.unit = "struct time / kernel time"


class EncodeTrades:
    """One ``records.encode`` of 14,169 trades into a preallocated buffer, as ``Publisher.publish_records`` does."""

    repeat = (10, 200, 1.0)

    def setup(self):
        self.f = common.trade_fixture()

    def time_encode(self):
        common.encode_trades(self.f)

    def track_records_per_second(self):
        return len(self.f.trades) / common.best_time(lambda: common.encode_trades(self.f))

    track_records_per_second.unit = "records/s"

    def track_ratio_to_struct(self):
        """Above 1: faster than ``struct.pack_into`` per message in Python."""
        return common.speed_ratio(
            lambda: common.encode_trades(self.f), lambda: common.struct_encode_trades(self.f), rounds=3
        )

    track_ratio_to_struct.unit = "struct time / kernel time"
