"""Kernel throughput: scan over message size, reject share and records per message, with and without CRC.

Each ``time_*`` times one kernel call over a ~2 MiB buffer built in ``setup``
(see ``common``); each ``track_*`` turns the best of a few calls into messages
per second, the figure the targets are stated in. Only the kernel is timed:
buffers and output arrays are built in ``setup``, and the kernels are loaded
(or built) when this module is imported.
"""

from __future__ import annotations

import zlib

from jitrelay import kernels

from . import common

CRC = [False, True]

common.load_kernels()


class _Prebuilt:
    """Benchmarks of one kernel over what ``fixture`` builds in ``setup`` (kept as ``self.f``), never timed."""

    # asv re-runs setup before every sample and times one call per sample
    # (about 0.1-5 ms here), so ask for many samples within a short time.
    repeat = (10, 200, 1.0)

    def fixture(self, *params):
        raise NotImplementedError

    def setup(self, *params):
        self.f = self.fixture(*params)


class _Scan(_Prebuilt):
    """One ``scan_into`` over a prebuilt buffer; subclasses say which buffer."""

    param_names: list[str]
    params: list[list]

    def fixture(self, *params) -> common.ScanFixture:
        raise NotImplementedError

    def time_scan(self, *params):
        self.f.scan()

    def track_messages_per_second(self, *params):
        return self.f.result.count / common.best_time(self.f.scan)

    track_messages_per_second.unit = "messages/s"


class ScanSize(_Scan):
    """Every message forwarded; one type-1 record filling the message."""

    param_names = ["size", "crc"]
    params = [[40, 71, 256, 1024, 4096], CRC]

    def fixture(self, size, crc):
        return common.scan_by_size(size, crc)


class ScanRejects(_Scan):
    """71-byte messages, a share of them rejected (wrong domain or TLV type out of range)."""

    param_names = ["reject_share", "crc"]
    params = [[0.0, 0.25, 0.5, 1.0], CRC]

    def fixture(self, reject_share, crc):
        return common.scan_by_rejects(reject_share, crc)


class ScanRecords(_Scan):
    """256-byte messages whose payload is split into 1, 4 or 16 records."""

    param_names = ["records", "crc"]
    params = [[1, 4, 16], CRC]

    def fixture(self, records, crc):
        return common.scan_by_records(records, crc)


class Route(_Prebuilt):
    """``kernels.route`` after a scan of 71-byte messages: masks and runs for 1, 4, 16 or 64 subscriber groups.

    Per message of the scanned batch; the stream cycles through four TLV types,
    so each single-type group takes every fourth message (runs of one message).
    """

    param_names = ["groups"]
    params = [[1, 4, 16, 64]]
    fixture = staticmethod(common.route_fixture)

    def time_route(self, groups):
        self.f.route()

    def track_messages_per_second(self, groups):
        return self.f.scan.result.count / common.best_time(self.f.route)

    track_messages_per_second.unit = "messages/s"


class Compact(_Prebuilt):
    """``kernels.compact`` of the runs a scan of 71-byte messages left, over reject share."""

    param_names = ["reject_share"]
    params = [[0.0, 0.25, 0.5, 1.0]]
    fixture = staticmethod(common.compact_fixture)

    def time_compact(self, reject_share):
        kernels.compact(self.f.buf, self.f.runs, self.f.n_runs, self.f.out)


class Frame(_Prebuilt):
    """``kernels.frame``: the bare header walk a subscriber uses, on 71-byte messages (the buffer is ``self.f``)."""

    fixture = staticmethod(common.frame_fixture)

    def time_frame(self):
        kernels.frame(self.f)


class Crc32(_Prebuilt):
    """``kernels.crc32`` against ``zlib.crc32`` on the same 1 MiB of random bytes (``self.f``)."""

    fixture = staticmethod(common.crc_data)

    def time_kernel(self):
        kernels.crc32(self.f)

    def time_zlib(self):
        zlib.crc32(self.f)

    def track_ratio_to_zlib(self):
        """Above 1: the kernel is faster than zlib."""
        return common.speed_ratio(lambda: kernels.crc32(self.f), lambda: zlib.crc32(self.f))

    track_ratio_to_zlib.unit = "zlib time / kernel time"


class VerifyVsZlib:
    """A scan that verifies every checksum against one ``zlib.crc32`` over the same buffer.

    The ratio says how close checksum verification inside the scan comes to
    zlib's speed on the same bytes; above 1, the scan is faster.
    """

    param_names = ["size"]
    params = [[71, 1024, 4096]]

    def track_ratio_to_zlib(self, size):
        f = common.scan_by_size(size, True)
        return common.speed_ratio(f.scan, lambda: zlib.crc32(f.buf))

    track_ratio_to_zlib.unit = "zlib time / scan time"
