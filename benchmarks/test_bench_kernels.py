"""Kernel micro-benchmarks: ``python -m pytest benchmarks --benchmark-only``.

Not part of the test suite: nothing here asserts a speed. Each benchmark times
one kernel call on bytes built beforehand (the same builders as the asv suite,
``asv_bench.common``), then times a baseline on the same bytes in the same run
and attaches msg/s and the ratio to ``benchmark.extra_info``; the run ends with
a summary of those figures. Baselines:

- scan: ``kernels.frame`` over the same buffer, the bare header walk a scan
  cannot beat;
- scan with checksums and ``kernels.crc32``: one ``zlib.crc32`` over the same bytes;
- compact and frame: one numpy copy of the same bytes, a yardstick for the machine;
- decoding and encoding trades: the Python loop of ``struct.unpack_from``
  (``struct.pack_into``) per message over the same trades, the bench's.
"""

from __future__ import annotations

import zlib

import numpy as np
from asv_bench import common

from jitrelay import kernels, records

SIZE = 71  # W1's message: one type-1 record with a 37-byte value


def _scan(benchmark, figures, crc: bool, baseline: str, baseline_fn) -> None:
    """Time a scan of W1 messages, every one accepted in one run (with ``crc``, every checksum verified and good)."""
    f = common.scan_by_size(SIZE, crc)
    result = benchmark(f.scan)
    assert result.count == f.result.count and result.runs == 1
    figures.record(
        benchmark,
        messages=f.result.count,
        nbytes=len(f.buf),
        baseline=baseline,
        baseline_call=lambda: baseline_fn(f.buf),
    )


def test_scan_market_data(benchmark, figures):
    _scan(benchmark, figures, False, "kernels.frame", kernels.frame)


def test_scan_with_crc(benchmark, figures):
    _scan(benchmark, figures, True, "zlib.crc32", zlib.crc32)


def test_crc32_kernel(benchmark, figures):
    data = common.crc_data()
    assert benchmark(kernels.crc32, data) == zlib.crc32(data)
    figures.record(benchmark, nbytes=len(data), baseline="zlib.crc32", baseline_call=lambda: zlib.crc32(data))


def test_crc32_zlib(benchmark, figures):
    data = common.crc_data()
    benchmark(zlib.crc32, data)
    figures.record(benchmark, nbytes=len(data))


def test_route_four_groups(benchmark, figures):
    f = common.route_fixture(4)
    routed = benchmark(f.route)
    count = f.scan.result.count
    assert routed.counts[:4].tolist() == [(count - g + 3) // 4 for g in range(4)]  # one-message runs, a quarter each
    figures.record(
        benchmark, messages=count, nbytes=len(f.scan.buf), baseline="scan of the same buffer", baseline_call=f.scan.scan
    )


def test_compact_quarter_rejected(benchmark, figures):
    f = common.compact_fixture(0.25)
    kept = benchmark(kernels.compact, f.buf, f.runs, f.n_runs, f.out)
    assert len(kept) == f.nbytes
    source = np.ones(f.nbytes, dtype=np.uint8)
    figures.record(
        benchmark,
        messages=f.nbytes // SIZE,
        nbytes=f.nbytes,
        baseline="numpy copy",
        baseline_call=lambda: np.copyto(f.out[: f.nbytes], source),
    )


def test_frame(benchmark, figures):
    buf = common.frame_fixture(SIZE)
    count, consumed, fault = benchmark(kernels.frame, buf)
    assert (count, consumed, fault) == (len(buf) // SIZE, len(buf), 0)
    copy = np.empty_like(buf)
    figures.record(
        benchmark, messages=count, nbytes=len(buf), baseline="numpy copy", baseline_call=lambda: np.copyto(copy, buf)
    )


def test_decode_trades(benchmark, figures):
    f = common.trade_fixture()
    columns = benchmark(records.decode, f.batch, "trade")
    assert len(columns.records) == len(f.trades) and columns.truncated == 0
    figures.record(
        benchmark,
        messages=len(f.trades),
        nbytes=len(f.batch),
        baseline="struct.unpack_from",
        baseline_call=lambda: common.struct_decode_trades(f),
    )


def test_decode_trades_copy(benchmark, figures):
    f = common.trade_fixture()
    columns = benchmark(records.decode, f.batch, "trade", copy=True)
    assert len(columns.records) == len(f.trades) and columns.records.flags.c_contiguous
    figures.record(benchmark, messages=len(f.trades), nbytes=len(f.batch))


def test_encode_trades(benchmark, figures):
    f = common.trade_fixture()
    assert len(benchmark(common.encode_trades, f)) == len(f.batch)
    figures.record(
        benchmark,
        messages=len(f.trades),
        nbytes=len(f.batch),
        baseline="struct.pack_into",
        baseline_call=lambda: common.struct_encode_trades(f),
    )
