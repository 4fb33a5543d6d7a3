"""The kernels' public face: framing, validation, runs, routing, compaction, CRC-32 over uint8 buffers.

The relay hands each read to ``scan_into`` once. The scan walks the 32-byte
headers of every complete message in ``buf[start:end]``, gives each a verdict
(``protocol.FORWARD`` or a reject reason), merges adjacent forwarded messages
into runs, and stops at the first partial message or at a stream-fatal fault.

Goals: no allocation inside the loops, no Python objects, and work
proportional to the bytes of complete messages: a partial message costs a
re-read of its header only, never of its payload.

Each public function here checks its arguments and allocates; the loops that
do the work live in ``loops``. Which build of them runs is chosen once, at
the first call (``backend``): by default the ahead-of-time module built with
the package, else one built at run time into the cache folder (``build``);
numba's JIT with ``JITRELAY_KERNELS=jit`` or when no module can be built or
loaded; plain Python under ``NUMBA_DISABLE_JIT=1``. Each fallback is a
warning that says why and what it costs. The ahead-of-time
module trusts its arguments, so the checks here are what keeps a wrong dtype
from reading the wrong memory.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from jitrelay.core import protocol as p
from jitrelay.core.domains import RelayLogic
from jitrelay.kernels import build
from jitrelay.kernels.constants import READ_FORWARDED as READ_FORWARDED
from jitrelay.kernels.constants import READ_JUDGED as READ_JUDGED
from jitrelay.kernels.constants import READ_NOT_TAKEN as READ_NOT_TAKEN
from jitrelay.kernels.constants import SEND_FAILED as SEND_FAILED  # re-exported: the engine reads them here
from jitrelay.kernels.constants import SEND_SKIPPED as SEND_SKIPPED
from jitrelay.kernels.constants import STAGE_ALL as STAGE_ALL
from jitrelay.kernels.constants import STAGE_JUDGE as STAGE_JUDGE
from jitrelay.kernels.constants import STAGE_SEND as STAGE_SEND

log = logging.getLogger("jitrelay.kernels")

BACKENDS = ("aot", "jit")


class _Backend:
    """Stands in for the loops until the first call, which loads them and replaces it."""

    def __getattr__(self, name: str) -> Any:  # a compiled entry point: typed by its signature in ``build``
        return getattr(_loaded(), name)


def requested_backend() -> str:
    """The build this process asks for: ``python`` under ``NUMBA_DISABLE_JIT``, else ``$JITRELAY_KERNELS`` (``aot``)."""
    if os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"):
        return "python"
    choice = os.environ.get("JITRELAY_KERNELS", "aot")
    if choice not in BACKENDS:
        raise ValueError(f"JITRELAY_KERNELS must be one of {', '.join(BACKENDS)}, not {choice!r}")
    return choice


def _loaded() -> ModuleType:
    """The loops, loaded (and ``_loops`` set) at the first call."""
    global _loops
    if isinstance(_loops, _Backend):
        _loops = _load()
    return _loops


def _load() -> ModuleType:
    started = time.perf_counter()
    choice = requested_backend()
    if choice == "aot":
        try:
            module = _load_compiled()
        except build.Unavailable as error:
            log.warning(
                "no ahead-of-time build of the kernels (%s); compiling them with numba in this process instead: "
                "%s of compiling at the first calls and about %d MiB more resident memory for numba and LLVM",
                error,
                JIT_COST_SECONDS,
                JIT_COST_MIB,
            )
        else:
            _BACKEND_INFO.update(name="aot", path=module.__file__, seconds=time.perf_counter() - started)
            return module
        choice = "jit"
    elif choice == "jit":
        log.info("JITRELAY_KERNELS=jit: numba compiles the kernels at their first calls (%s)", JIT_COST_SECONDS)
    from jitrelay.kernels import loops

    _BACKEND_INFO.update(name=choice, path=loops.__file__, seconds=time.perf_counter() - started)
    return loops


# What the fallbacks cost, as measured on a 2-core machine; the warnings quote them.
BUILD_COST_SECONDS = "5 to 10 s"
JIT_COST_SECONDS = "about 5 s"
JIT_COST_MIB = 150


def _load_compiled() -> ModuleType:
    """The module built with the package, else the one built at run time in the cache folder (built now if needed)."""
    try:
        return build.load_packaged()
    except build.Unavailable as error:
        not_packaged = str(error)

    def announce(path: Path) -> None:
        log.warning(
            "%s; building the kernels now with numba and the C compiler into %s (%s, once per machine and version)",
            not_packaged,
            path,
            BUILD_COST_SECONDS,
        )

    module = build.load(announce=announce)
    log.info("%s; loaded the kernels built at run time", not_packaged)
    return module


_BACKEND_INFO: dict = {"name": None, "path": None, "seconds": None}
_loops: ModuleType | _Backend = _Backend()


def backend() -> dict:
    """Which build of the loops runs here (``aot``, ``jit`` or ``python``), where from, and how long loading took."""
    _loaded()
    return dict(_BACKEND_INFO)


_U8, _I64, _U64 = np.dtype(np.uint8), np.dtype(np.int64), np.dtype(np.uint64)


def _bytes(buf: object, name: str = "buf", writable: bool = False) -> np.ndarray:
    """``buf`` when it is a contiguous 1-D uint8 array, else a clear error (the loops would read past it)."""
    checked = _array(buf, _U8, 1, name)
    if writable and not checked.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return checked


_DIMENSIONS = {1: "one-dimensional", 2: "two-dimensional"}


def _array(a: object, dtype: np.dtype, ndim: int, name: str) -> np.ndarray:
    """``a`` when it is a contiguous array of this dtype and rank, else a clear error."""
    # The first test is the relay's every call, kept cheap: exact type, numpy's own dtype object.
    if not (type(a) is np.ndarray and a.dtype is dtype and a.ndim == ndim and a.flags.c_contiguous) and not (
        isinstance(a, np.ndarray) and a.dtype == dtype and a.ndim == ndim and a.flags.c_contiguous
    ):
        raise TypeError(f"{name} must be a contiguous {_DIMENSIONS[ndim]} {dtype.name} numpy array")
    return a


def _check_tables(tables: KernelTables) -> None:
    """``tables`` indexable by any TLV type; the tables last checked are not checked again (a relay has one)."""
    global _checked_tables
    if tables is not _checked_tables:
        if len(_array(tables.type_allowed, _U8, 1, "type_allowed")) != 256:
            raise ValueError("type_allowed needs 256 entries, one per TLV type")
        if len(_array(tables.version_allowed, _U8, 1, "version_allowed")) != 256:
            raise ValueError("version_allowed needs 256 entries, one per version byte")
        if tables.checksum_policy not in p.CHECKSUM_POLICIES.values():
            raise ValueError(f"checksum_policy must be one of {sorted(p.CHECKSUM_POLICIES.values())}")
        _checked_tables = tables


_checked_tables: KernelTables | None = None


def _range(buf: np.ndarray, start: int, end: int) -> None:
    if not 0 <= start <= end <= len(buf):
        raise ValueError(f"range {start}..{end} is outside a buffer of {len(buf)} bytes")


def _make_crc_tables() -> np.ndarray:
    tables = np.zeros((8, 256), dtype=np.int64)
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        tables[0, n] = c
    for n in range(256):
        c = tables[0, n]
        for k in range(1, 8):
            c = tables[0, c & 0xFF] ^ (c >> 8)
            tables[k, n] = c
    return tables


CRC_TABLES = _make_crc_tables()  # slicing-by-8


class KernelTables(NamedTuple):
    """What the scan needs to know of a domain, as flat values and one array."""

    domain: int
    max_payload: int
    checksum_policy: int  # protocol.CHECKSUM_OFF, CHECKSUM_IF_SET or CHECKSUM_REQUIRED
    type_allowed: np.ndarray  # uint8[256]; 1 where the domain carries the TLV type
    version_allowed: np.ndarray  # uint8[256]; 1 for each header version the relay accepts


def tables_for(logic: RelayLogic) -> KernelTables:
    """The scan's view of a domain's rules."""
    return KernelTables(
        logic.domain_id,
        logic.max_payload,
        p.CHECKSUM_POLICIES[logic.checksum],
        logic.type_allowed(),
        logic.version_allowed(),
    )


class ScanResult(NamedTuple):
    """What one scan found: its counts, where framing stopped, and why."""

    count: int  # type: ignore[assignment]  # complete messages framed (a field may shadow tuple.count)
    consumed: int  # offset just past the last complete message
    fault: int  # protocol.NO_FAULT, BAD_MAGIC or OVERSIZE
    runs: int  # runs of forwarded messages written to ``ScanBuffers.runs``
    forwarded_bytes: int
    controls: int = 0  # control messages among them (verdict ``protocol.CONTROL``)


class ScanBuffers:
    """Output arrays of a scan, allocated once per connection and reused.

    ``offsets[i]`` is where message ``i`` starts and ``offsets[count]`` is
    ``consumed``; ``verdicts[i]`` is its verdict; ``runs[2k]``/``runs[2k+1]``
    bound the k-th run of forwarded messages; ``counts[v]`` accumulates
    messages per verdict across calls.
    """

    def __init__(self, capacity: int):
        slots = capacity // p.HEADER_SIZE + 2
        self.capacity = capacity
        self.offsets = np.zeros(slots, dtype=np.int64)
        self.verdicts = np.zeros(slots, dtype=np.uint8)
        self.runs = np.zeros(2 * slots, dtype=np.int64)
        self.counts = np.zeros(len(p.VERDICT_NAMES), dtype=np.int64)


def scan_into(
    buf: np.ndarray,
    start: int,
    end: int,
    tables: KernelTables,
    out: ScanBuffers,
    counts: np.ndarray | None = None,
) -> ScanResult:
    """Frame and judge every complete message in ``buf[start:end]``.

    Results go to ``out`` (see ``ScanBuffers``); verdicts are tallied into
    ``counts`` (default ``out.counts``), so one ``ScanBuffers`` can serve many
    connections that keep their own tallies. On a fault, ``consumed`` is the
    offset of the faulty header: messages before it were judged normally.
    """
    return ScanResult(*_loops.scan(*_scan_args(buf, start, end, tables, out, counts)))


def _scan_args(
    buf: np.ndarray, start: int, end: int, tables: KernelTables, out: ScanBuffers, counts: np.ndarray | None
) -> tuple:
    """The arguments of ``loops.scan``, checked."""
    _range(_bytes(buf), start, end)
    if end - start > out.capacity:
        raise ValueError(f"scan range of {end - start} bytes exceeds the buffers' capacity of {out.capacity}")
    if counts is not None and len(_array(counts, _I64, 1, "counts")) < len(p.VERDICT_NAMES):
        raise ValueError(f"counts needs {len(p.VERDICT_NAMES)} slots, one per verdict")
    _check_tables(tables)
    return (
        buf,
        start,
        end,
        tables.domain,
        tables.max_payload,
        tables.checksum_policy,
        tables.type_allowed,
        tables.version_allowed,
        out.offsets,
        out.verdicts,
        out.runs,
        out.counts if counts is None else counts,
        CRC_TABLES,
    )


def scan(
    buf: np.ndarray, tables: KernelTables, start: int = 0, end: int | None = None
) -> tuple[ScanResult, ScanBuffers]:
    """``scan_into`` with freshly allocated buffers: for tools, tests and notebooks."""
    end = len(buf) if end is None else end
    out = ScanBuffers(end - start)
    return scan_into(buf, start, end, tables, out), out


def frame(buf: np.ndarray, start: int = 0, end: int | None = None) -> tuple[int, int, int]:
    """Count the complete messages in ``buf[start:end]`` without judging them.

    Returns ``(count, consumed, fault)``; subscribers use it to cut a stream
    into whole messages.
    """
    end = len(_bytes(buf)) if end is None else end
    _range(buf, start, end)
    return _loops.frame(buf, start, end)


def compact(buf: np.ndarray, runs: np.ndarray, n_runs: int, out: np.ndarray | None = None) -> np.ndarray:
    """Copy the forwarded runs of a scan back to back into one array."""
    _bytes(buf)
    if not 0 <= n_runs <= len(_array(runs, _I64, 1, "runs")) // 2:
        raise ValueError(f"{n_runs} runs do not fit in an array of {len(runs)} bounds")
    starts, ends = runs[0 : 2 * n_runs : 2], runs[1 : 2 * n_runs : 2]
    if n_runs and (starts.min() < 0 or ends.max() > len(buf) or (ends < starts).any()):
        raise ValueError("runs reach outside the buffer")
    total = int((ends - starts).sum())
    if out is None:
        out = np.empty(total, dtype=np.uint8)
    elif len(_bytes(out, "out", writable=True)) < total:
        raise ValueError(f"output of {len(out)} bytes cannot hold {total}")
    _loops.compact(buf, runs, n_runs, out)
    return out[:total]


def log_append(
    buf: np.ndarray, runs: np.ndarray, n_runs: int, ring: np.ndarray, size: int, mirror: int, at: int
) -> int:
    """Copy a scan's forwarded runs into the relay's log ring at ``at``, wrapping at ``size``; the bytes appended.

    ``ring`` holds ``size + mirror`` bytes: its first ``mirror`` bytes are
    repeated after the end, so a message that starts before the wrap is whole.
    """
    _bytes(buf)
    _bytes(ring, "ring", writable=True)
    if not 0 <= n_runs <= len(_array(runs, _I64, 1, "runs")) // 2:
        raise ValueError(f"{n_runs} runs do not fit in an array of {len(runs)} bounds")
    if not (size > 0 and 0 <= mirror <= size and size + mirror <= len(ring) and 0 <= at < size):
        raise ValueError(f"a ring of {len(ring)} bytes cannot be {size} plus a mirror of {mirror} written at {at}")
    appended = int(_loops.log_append(buf, runs, n_runs, ring, size, mirror, at))  # checks the runs itself
    if appended < 0:
        raise ValueError("runs reach outside the buffer, or hold more bytes than the ring")
    return appended


class FanOut:
    """The send loop's arrays (``send_loop.send_all``), owned here so that a batch's call passes a few integers.

    The engine writes each target's descriptor and, for ``send``, the slice of
    ``iovecs`` it gets (``iov_first``, ``iov_count``) and the ``(address,
    length)`` pairs those slices hold. ``send_uniform`` gives every target the
    same first iovecs and keeps the slices right itself. ``totals`` adds up what
    each target took; ``reserve`` grows the arrays.
    """

    def __init__(self, targets: int = 16, iovecs: int = 64) -> None:
        self.fds = np.full(targets, -1, dtype=np.int64)
        self.iov_first = np.zeros(targets, dtype=np.int64)
        self.iov_count = np.zeros(targets, dtype=np.int64)
        self.sent = np.zeros(targets, dtype=np.int64)
        self.totals = np.zeros(targets, dtype=np.int64)
        self.iovecs = np.zeros(2 * iovecs, dtype=np.uint64)
        self.msghdr = np.zeros(7, dtype=np.uint64)
        self._uniform: tuple[int, int] | None = None  # (targets, iovecs) the slices hold for send_uniform
        self._args: tuple | None = None  # the loop's array arguments for the last target count, sliced once

    def reserve(self, targets: int, iovecs: int) -> None:
        """Room for ``targets`` targets and ``iovecs`` iovecs, keeping what is there."""
        if targets > len(self.fds):
            size = max(targets, 2 * len(self.fds))
            for name in ("fds", "iov_first", "iov_count", "sent", "totals"):
                old = getattr(self, name)
                new = np.full(size, -1, dtype=np.int64) if name == "fds" else np.zeros(size, dtype=np.int64)
                new[: len(old)] = old
                setattr(self, name, new)
            self._uniform = None
        if 2 * iovecs > len(self.iovecs):
            grown = np.zeros(max(2 * iovecs, 2 * len(self.iovecs)), dtype=np.uint64)
            grown[: len(self.iovecs)] = self.iovecs
            self.iovecs = grown

    def send(self, targets: int, skip: int = -1) -> int:
        """Hand the first ``targets`` targets their iovecs, non-blocking; how many took less than all.

        ``sent`` then holds per target what its socket took: ``SEND_FAILED``
        (-1) when nothing could be sent (its socket is full, or an error the
        engine finds on its next send), ``SEND_SKIPPED`` (-2) for ``skip``.
        """
        if not 0 <= targets <= len(self.fds):
            raise ValueError(f"{targets} targets, room for {len(self.fds)}")
        first, count = self.iov_first[:targets], self.iov_count[:targets]
        if targets and (
            int(first.min()) < 0 or int(count.min()) < 0 or int((first + count).max()) > len(self.iovecs) // 2
        ):
            raise ValueError("a target's iovecs reach outside the iovec array")
        self._uniform = None
        return self._call(targets, skip)

    def send_uniform(self, targets: int, iovecs: int, skip: int = -1) -> int:
        """``send`` with every target given the first ``iovecs`` iovecs (a batch for everyone unfiltered)."""
        if not (0 <= targets <= len(self.fds) and 0 <= iovecs <= len(self.iovecs) // 2):
            raise ValueError(
                f"{targets} targets of {iovecs} iovecs, room for {len(self.fds)} of {len(self.iovecs) // 2}"
            )
        if self._uniform != (targets, iovecs):
            self.iov_first[:targets] = 0
            self.iov_count[:targets] = iovecs
            self._uniform = (targets, iovecs)
        return self._call(targets, skip)

    def place_groups(
        self, scan_runs: np.ndarray, n_scan: int, stream_start: int, routed: RouteBuffers, groups: int,
        address: int, size: int, at: int,
    ) -> np.ndarray:  # fmt: skip
        """Write each group's runs of a batch as iovecs into the log's ring from iovec ``at`` (``group_iovecs``).

        The batch's forwarded runs ``scan_runs[:2 * n_scan]`` were appended to
        the log from stream offset ``stream_start``; the ring has ``size``
        bytes at ``address``. Returns ``(3, groups)``: each group's first
        iovec, iovec count and bytes.
        """
        if not (0 < groups <= len(routed.first) and 0 <= n_scan <= len(_array(scan_runs, _I64, 1, "scan_runs")) // 2):
            raise ValueError(f"{groups} groups and {n_scan} runs do not fit the arrays given")
        runs = int(routed.counts[:groups].sum())
        if int((routed.first[:groups] + routed.counts[:groups]).max()) * 2 > len(routed.runs) or (runs and not n_scan):
            raise ValueError("the groups' runs reach outside their array, or there are runs but no batch")
        # A group's runs are cut in two at most once: where the ring wraps.
        self.reserve(len(self.fds), at + runs + groups)
        out = np.empty(3 * groups, dtype=np.int64)
        _loops.group_iovecs(
            scan_runs, n_scan, stream_start, routed.first, routed.counts, routed.runs, groups, address, size,
            self.iovecs, at, out,
        )  # fmt: skip
        self._uniform = None
        return out.reshape(3, groups)

    def _call(self, targets: int, skip: int) -> int:
        fds, first, count, sent, totals = self.target_views(targets)
        return int(_io_loop("send_all")(fds, skip, first, count, self.iovecs, self.msghdr, sent, totals))

    def target_views(self, targets: int) -> tuple[np.ndarray, ...]:
        """``fds``, ``iov_first``, ``iov_count``, ``sent`` and ``totals`` of the first ``targets``, sliced once."""
        args = self._args
        if args is None or args[0] is not self.fds or args[1] != targets:
            views = tuple(a[:targets] for a in (self.fds, self.iov_first, self.iov_count, self.sent, self.totals))
            args = self._args = (self.fds, targets, views)
        return args[2]


class GroupRoute:
    """What the read loop needs to give each filtered group its own runs of a batch, bound once per set of targets.

    ``tables`` are the groups' filters (``group_tables``; None: no filter),
    ``routed`` the route buffers (grown here to fit the tables and the scan
    buffers: take ``routed`` back), ``target_group`` each send-loop target's
    group (-1: unfiltered, it gets the whole batch). After a forwarded read,
    ``placed`` holds each group's first iovec, iovec count and bytes.
    """

    def __init__(
        self, tables: GroupTables | None, routed: RouteBuffers, scanned: ScanBuffers, target_group: np.ndarray
    ) -> None:
        groups = 0 if tables is None else tables.groups
        if tables is not None:
            _check_groups(tables)
            routed = _fitted(routed, tables, scanned)
        else:
            tables = _NO_GROUP_TABLES
        self.target_group = _array(target_group, _I64, 1, "target_group")
        if len(target_group) and not (int(target_group.min()) >= -1 and int(target_group.max()) < groups):
            raise ValueError(f"target groups outside -1..{groups - 1}")
        self.routed = routed
        self._bound = (routed.runs, routed.masks)  # the arrays the loops get: ``routed`` may grow new ones
        self.groups = groups
        self.placed = np.zeros(3 * max(1, groups), dtype=np.int64)
        self.args = (
            groups, tables.type_groups, tables.source_groups, tables.untyped, routed.masks, routed.first,
            routed.counts, routed.sizes, routed.runs, self.target_group, self.placed,
        )  # fmt: skip

    def current(self, routed: RouteBuffers) -> bool:
        """Whether this binding still holds ``routed``'s arrays (a scan elsewhere may have grown them)."""
        runs, masks = self._bound
        return routed is self.routed and routed.runs is runs and routed.masks is masks

    def due(self, targets: int, size: int) -> np.ndarray:
        """What each of the first ``targets`` targets was to be sent of the last forwarded batch of ``size`` bytes."""
        if not self.groups:
            return np.full(targets, size, dtype=np.int64)
        return np.concatenate(([size], self.placed[2 * self.groups : 3 * self.groups]))[self.target_group[:targets] + 1]


def _io_loop(name: str) -> Any:
    """A compiled loop that does I/O (``send_all``, ``forward_read``, ``read_ready``): AOT if built, else numba."""
    loop = _IO_LOOPS.get(name)
    if loop is None:
        loop = getattr(_loaded(), name, None)
        if loop is None:  # the JIT and Python builds only: these modules import numba
            from jitrelay.kernels import poll_loop, read_loop, send_loop

            module = {"forward_read": read_loop, "read_ready": poll_loop}.get(name, send_loop)
            loop = getattr(module, name)
            if name == "forward_read" and requested_backend() == "python":
                loop = _as_ints(loop)
        _IO_LOOPS[name] = loop
    return loop


_IO_LOOPS: dict[str, Any] = {}


def _as_ints(loop: Any) -> Any:
    """``loop`` returning a tuple of Python ints: as plain Python its integers are numpy's, as compiled they are not."""

    def call(*args: Any) -> tuple[int, ...]:
        return tuple(int(value) for value in loop(*args))

    return call


class GroupTables(NamedTuple):
    """The filters of the subscriber groups, as per-byte-value bitmasks of groups (64 groups a word).

    Bit ``g`` of ``type_groups[t]`` is set when group ``g`` wants TLV type
    ``t``; of ``untyped``, when group ``g`` has no type filter; of
    ``source_groups[s]``, when group ``g`` wants source ``s`` or has no source
    filter. A message goes to group ``g`` when bit ``g`` of
    ``(untyped | OR of type_groups[t] over its records) & source_groups[source]`` is set.
    """

    type_groups: np.ndarray  # uint64[256, words]
    source_groups: np.ndarray  # uint64[256, words]
    untyped: np.ndarray  # uint64[words]
    groups: int


def group_tables(filters: list[p.Filter]) -> GroupTables:
    """The tables for groups ``0..len(filters)-1`` with these ``(tlv_types, sources)`` filters."""
    words = max(1, (len(filters) + 63) // 64)
    type_groups = np.zeros((256, words), dtype=np.uint64)
    source_groups = np.zeros((256, words), dtype=np.uint64)
    untyped = np.zeros(words, dtype=np.uint64)
    for g, (tlv_types, sources) in enumerate(filters):
        word, bit = divmod(g, 64)
        flag = np.uint64(1 << bit)
        if tlv_types is None:
            untyped[word] |= flag
        else:
            type_groups[sorted(tlv_types), word] |= flag
        if sources is None:
            source_groups[:, word] |= flag
        else:
            source_groups[sorted(sources), word] |= flag
    return GroupTables(type_groups, source_groups, untyped, len(filters))


_NO_GROUP_TABLES = GroupTables(
    np.zeros((256, 1), dtype=np.uint64), np.zeros((256, 1), dtype=np.uint64), np.zeros(1, dtype=np.uint64), 0
)


class RouteBuffers:
    """Outputs of ``route``, reused across calls and grown when a batch needs more.

    ``masks[i]`` holds the groups message ``i`` goes to; group ``g`` has
    ``counts[g]`` runs at ``runs[2 * first[g]:]`` (start, end pairs) totalling
    ``sizes[g]`` bytes.
    """

    def __init__(self, capacity: int, groups: int):
        slots = capacity // p.HEADER_SIZE + 2
        self.capacity = capacity
        self.masks = np.zeros((slots, max(1, (groups + 63) // 64)), dtype=np.uint64)
        self.first = np.zeros(max(1, groups), dtype=np.int64)
        self.counts = np.zeros(max(1, groups), dtype=np.int64)
        self.sizes = np.zeros(max(1, groups), dtype=np.int64)
        self.runs = np.zeros(2 * slots, dtype=np.int64)

    def group_runs(self, group: int) -> np.ndarray:
        """The (start, end) pairs of ``group``'s runs, flat."""
        first = self.first[group]
        return self.runs[2 * first : 2 * (first + self.counts[group])]


def route(buf: np.ndarray, scanned: ScanBuffers, count: int, tables: GroupTables, out: RouteBuffers) -> RouteBuffers:
    """Split the forwarded messages of the last scan of ``buf`` into runs per subscriber group.

    ``scanned`` and ``count`` are that scan's buffers and message count. One
    pass gives every message a mask of the groups that want it, a second cuts
    the runs; ``out`` is returned, grown if this batch needed more room.
    """
    _bytes(buf)
    if not 0 <= count < len(scanned.offsets) or scanned.offsets[count] > len(buf):
        raise ValueError(f"{count} messages were not scanned from this buffer")
    _check_groups(tables)
    out = _fitted(out, tables, scanned)
    _loops.group_masks(
        buf,
        scanned.offsets,
        scanned.verdicts,
        count,
        tables.type_groups,
        tables.source_groups,
        tables.untyped,
        out.masks,
    )
    needed = _loops.group_runs(
        scanned.offsets, out.masks, count, tables.groups, out.first, out.counts, out.sizes, out.runs
    )
    return _runs_fitted(out, tables, scanned, count, needed)


NO_ROUTE = GroupRoute(None, RouteBuffers(0, 0), ScanBuffers(0), np.zeros(0, dtype=np.int64))


def _check_groups(tables: GroupTables) -> None:
    """Group tables of the right types and shapes: the loops index them by byte value and group."""
    words = len(_array(tables.untyped, _U64, 1, "untyped"))
    for name in ("type_groups", "source_groups"):
        if _array(getattr(tables, name), _U64, 2, name).shape != (256, words):
            raise ValueError(f"{name} must be 256 rows of {words} words")
    if not 0 <= tables.groups <= 64 * words:
        raise ValueError(f"{tables.groups} groups do not fit in {words} words")


def _fitted(out: RouteBuffers, tables: GroupTables, scanned: ScanBuffers) -> RouteBuffers:
    """``out``, or new buffers when it is too small for these groups or this scan."""
    words = tables.type_groups.shape[1]
    if out.masks.shape[1] != words or len(out.counts) < tables.groups or out.capacity < scanned.capacity:
        return RouteBuffers(max(out.capacity, scanned.capacity), tables.groups)
    return out


def _runs_fitted(out: RouteBuffers, tables: GroupTables, scanned: ScanBuffers, count: int, needed: int) -> RouteBuffers:
    """Cut the runs again into a larger array when the batch had more runs than ``out.runs`` holds."""
    if 2 * needed > len(out.runs):
        out.runs = np.zeros(2 * needed, dtype=np.int64)
        _loops.group_runs(scanned.offsets, out.masks, count, tables.groups, out.first, out.counts, out.sizes, out.runs)
    return out


def scan_and_route(
    buf: np.ndarray,
    start: int,
    end: int,
    tables: KernelTables,
    out: ScanBuffers,
    groups: GroupTables,
    routed: RouteBuffers,
    counts: np.ndarray | None = None,
) -> tuple[ScanResult, RouteBuffers]:
    """``scan_into`` and ``route`` in one compiled call: what the relay runs while any subscriber has a filter.

    Returns the scan's result and the route buffers (``routed``, or larger
    ones if this batch needed them).
    """
    scan_args = _scan_args(buf, start, end, tables, out, counts)
    _check_groups(groups)
    routed = _fitted(routed, groups, out)
    *scanned, needed = _loops.scan_route(
        *scan_args,
        groups.type_groups,
        groups.source_groups,
        groups.untyped,
        groups.groups,
        routed.masks,
        routed.first,
        routed.counts,
        routed.sizes,
        routed.runs,
    )
    result = ScanResult(*scanned)
    return result, _runs_fitted(routed, groups, out, result.count, needed)


def crc32(data: np.ndarray, value: int = 0) -> int:
    """CRC-32 of a uint8 array, the same as ``zlib.crc32(data, value)``."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    return int(_loops.crc32(data, 0, len(data), value & 0xFFFFFFFF, CRC_TABLES))


def message_end(buf: np.ndarray, pos: int, end: int) -> int:
    """Where the message starting at ``pos`` ends, or -1 when ``buf[pos:end]`` does not hold it whole."""
    _range(_bytes(buf), pos, end)
    return int(_loops.next_message_end(buf, pos, end))


def message_crc(buf: np.ndarray, pos: int = 0) -> int:
    """The checksum a message at ``pos`` should carry."""
    _range(_bytes(buf), pos, len(buf))
    end = _loops.next_message_end(buf, pos, len(buf))
    if end < 0:
        raise ValueError("no complete message at that offset")
    return int(_loops.message_crc(buf, pos, end - pos, CRC_TABLES))


def stamp_batch(
    batch: np.ndarray, message_size: int, first_sequence: int, timestamp_ns: int, checksums: bool = True
) -> None:
    """Renumber a batch of equal-size messages in place and refresh their checksums.

    Lets a publisher reuse one buffer built by ``protocol.build_batch``.
    """
    _bytes(batch, "batch", writable=True)
    if message_size < p.HEADER_SIZE or len(batch) % message_size:
        raise ValueError("batch is not a whole number of messages of that size")
    count = len(batch) // message_size
    _loops.stamp_batch(
        batch, message_size, count, _as_int64(first_sequence), _as_int64(timestamp_ns), checksums, CRC_TABLES
    )


def _as_int64(value: int) -> int:
    """The int64 with the same 64 bits as ``value``: the kernel writes the bytes, not the sign."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value
