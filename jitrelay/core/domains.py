"""What makes one relay domain differ from another, and nothing else.

A ``RelayLogic`` is data: the domain id, the header versions and TLV types it
carries, its checksum policy, its limits and its slow-subscriber policy. The engine
never asks it anything per message; it turns itself once into the flat
``KernelTables`` the compiled scan reads. A new domain is one subclass and
one ``LOGICS`` entry.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from jitrelay.core import protocol, records
from jitrelay.core.units import KiB, MiB

# Checksum policies (PROTOCOL.md's domain table): not verified, verified when non-zero (zero means "not
# computed", as Torq's fast path writes), or verified and required.
CHECKSUM_OFF = "off"
CHECKSUM_IF_SET = "if_set"
CHECKSUM_REQUIRED = "required"
CHECKSUM_POLICIES = tuple(protocol.CHECKSUM_POLICIES)

DISCONNECT = "disconnect"
BLOCK = "block"
SLOW_POLICIES = (DISCONNECT, BLOCK)
# How an ordinary read is made and forwarded: by the relay's own epoll set and one compiled call per wake-up
# (``kernels.polling``); by the event loop's read callbacks and one compiled call per read
# (``kernels.read_path``); or by the engine's Python steps around smaller compiled calls. The same bytes every
# way: the last two are there to compare and profile.
READ_COMPILED = "compiled"
READ_UVLOOP = "uvloop"
READ_PYTHON = "python"
READ_PATHS = (READ_COMPILED, READ_UVLOOP, READ_PYTHON)
# When the journal is flushed to disk: after every write, every so often (``journal.py``), or never by the relay.
FSYNC_EVERY = "every"
FSYNC_BATCH = "batch"
FSYNC_NONE = "none"
JOURNAL_FSYNC = (FSYNC_EVERY, FSYNC_BATCH, FSYNC_NONE)
# What a relay does when a journal append fails: hold the publishers and retry (nothing unjournaled is
# forwarded), or forward the batch anyway and count the error.
JOURNAL_PAUSE = "pause"
JOURNAL_FORWARD = "forward"
JOURNAL_ON_ERROR = (JOURNAL_PAUSE, JOURNAL_FORWARD)

DEFAULT_SOCKET_DIR = "/tmp/jitrelay"
SOCKET_DIR_ENV = "JITRELAY_SOCKET_DIR"


def socket_dir() -> Path:
    """Where relays put their sockets: ``$JITRELAY_SOCKET_DIR``, else ``/tmp/jitrelay``."""
    return Path(os.environ.get(SOCKET_DIR_ENV) or DEFAULT_SOCKET_DIR)


STATS_SOCKET_SUFFIX = ".stats.sock"


def stats_socket_path(socket_path: Path) -> Path:
    """Where the relay on ``socket_path`` serves its figures: ``market_data.sock`` -> ``market_data.stats.sock``."""
    name = socket_path.name
    stem = name[: -len(".sock")] if name.endswith(".sock") else name
    return socket_path.with_name(stem + STATS_SOCKET_SUFFIX)


@dataclass
class RelayLogic:
    """One relay domain. Subclasses set the class-level defaults; instances may override any field."""

    name: ClassVar[str]
    # The header's relay_domain byte this relay takes. Torq's relays and codec number the domains 1..4;
    # producers built on Torq's newer ``libs/types`` enum write 0..3, and a relay can be told to take those.
    domain_id: int = 0
    tlv_ranges: tuple[tuple[int, int], ...] = ()
    # Vendor TLV types (``protocol.VENDOR_TLV_RANGE``, 200..254) pass in every domain unless this is off.
    vendor_types: bool = True
    # Header versions accepted; any other is ``bad_version``. 1 (what Torq writes) and 2 share one layout.
    versions: tuple[int, ...] = protocol.VERSIONS
    checksum: str = CHECKSUM_OFF
    max_payload: int = 1 * MiB
    slow_policy: str = DISCONNECT
    # Under ``disconnect`` a subscriber more than ``pending_high`` bytes behind
    # the head of the log has ``slow_timeout`` seconds to come back under
    # ``pending_low`` before it is cut off (one the log leaves behind is cut off
    # at once, or told of the gap if it asked for positions); nobody waits for it.
    pending_high: int = 8 * MiB
    pending_low: int = 2 * MiB
    slow_timeout: float = 1.0
    read_path: str = READ_COMPILED
    # Receive buffer per connection; raised to hold at least two max-size messages.
    buffer_size: int = 4 * MiB
    # The relay's log: one ring of every forwarded byte, from which each subscriber is sent its share and
    # behind which it may fall this far before the slow policy acts on it. Raised to two receive buffers.
    log_size: int = 64 * MiB
    socket_path: Path = field(default_factory=lambda: Path())
    # Who may connect, checked with the peer's credentials at accept: a peer
    # is allowed when its uid or its gid is listed. None admits anyone who can
    # reach the socket (its folder and file modes still apply).
    allowed_uids: tuple[int, ...] | None = None
    allowed_gids: tuple[int, ...] = ()
    max_connections: int = 5000
    # Append every forwarded message to a journal (see ``journal.py``).
    journal: bool = False
    journal_dir: Path = field(default_factory=lambda: Path())
    journal_fsync: str = FSYNC_BATCH
    journal_rotate_bytes: int = 256 * MiB
    journal_on_error: str = JOURNAL_FORWARD
    # Journal retention: delete the oldest whole segments while the journal holds more than this many bytes,
    # or once last written more than this many seconds ago (never the segment being written). None: keep all.
    journal_keep_bytes: int | None = None
    journal_keep_seconds: float | None = None
    # Serve Prometheus metrics over HTTP on 127.0.0.1 at this port; None serves none.
    metrics_port: int | None = None
    # TCP listeners beside the Unix socket, as ``tcp://HOST:PORT`` or ``tls://HOST:PORT`` (port 0 picks a
    # free one). Network peers have no credentials, so instead of the uid/gid allow-list their address must
    # be in one of ``allowed_networks``, and a TLS peer's certificate must name one of ``allowed_names``.
    listen: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # The TLS listeners' certificate chain and key (PEM). With ``tls_client_ca`` a client must present a
    # certificate that CA signed (mutual TLS); with ``allowed_names`` too, one whose subject CN or a DNS or
    # URI subject alternative name is listed. None admits any client the CA signed.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    allowed_names: tuple[str, ...] | None = None
    # When the relay stops it writes its final figures here as one JSON object (``Figures``); None writes none.
    summary_file: Path | None = None

    def __post_init__(self) -> None:
        if self.slow_policy not in SLOW_POLICIES:
            raise ValueError(f"slow_policy must be one of {SLOW_POLICIES}, not {self.slow_policy!r}")
        if self.read_path not in READ_PATHS:
            raise ValueError(f"read_path must be one of {READ_PATHS}, not {self.read_path!r}")
        if not 0 <= self.max_payload < (1 << 32):
            raise ValueError("max_payload must fit in 32 bits")
        if not 0 < self.pending_low <= self.pending_high:
            raise ValueError("need 0 < pending_low <= pending_high")
        if not self.slow_timeout > 0:
            raise ValueError("slow_timeout must be positive")
        for lo, hi in self.tlv_ranges:
            if not 1 <= lo <= hi <= 255:
                raise ValueError(f"TLV range {lo}..{hi} is not within 1..255")
        if self.checksum not in CHECKSUM_POLICIES:
            raise ValueError(f"checksum must be one of {CHECKSUM_POLICIES}, not {self.checksum!r}")
        if not self.versions or not all(0 <= v <= 255 for v in self.versions):
            raise ValueError(f"versions must name one or more header versions (0..255), not {self.versions!r}")
        if not 0 <= self.domain_id <= 254:
            raise ValueError(
                f"domain_id must be a domain byte (0..254; 255 is the control domain), not {self.domain_id}"
            )
        if self.socket_path == Path():
            self.socket_path = socket_dir() / f"{self.name}.sock"
        if self.journal_dir == Path():
            self.journal_dir = Path(self.socket_path).parent / "journal"
        if self.journal_fsync not in JOURNAL_FSYNC:
            raise ValueError(f"journal_fsync must be one of {JOURNAL_FSYNC}, not {self.journal_fsync!r}")
        if self.journal_on_error not in JOURNAL_ON_ERROR:
            raise ValueError(f"journal_on_error must be one of {JOURNAL_ON_ERROR}, not {self.journal_on_error!r}")
        if self.journal_keep_bytes is not None and self.journal_keep_bytes <= 0:
            raise ValueError(f"journal_keep_bytes must be positive, not {self.journal_keep_bytes}")
        if self.journal_keep_seconds is not None and not self.journal_keep_seconds > 0:
            raise ValueError(f"journal_keep_seconds must be positive, not {self.journal_keep_seconds}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be a TCP port (0..65535), not {self.metrics_port}")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._check_tls()
        try:
            self._networks = tuple(ipaddress.ip_network(net, strict=False) for net in self.allowed_networks)
        except ValueError as exc:
            raise ValueError(f"allowed_networks: {exc}") from None
        self.buffer_size = max(self.buffer_size, 2 * (protocol.HEADER_SIZE + self.max_payload))
        self.log_size = max(self.log_size, 2 * self.buffer_size)

    def _check_tls(self) -> None:
        """Refuse TLS settings that cannot work together; ValueError."""
        schemes = {parse_listener(address)[0] for address in self.listen}
        if TLS in schemes and (self.tls_cert is None or self.tls_key is None):
            raise ValueError("a tls:// listener needs tls_cert and tls_key (--tls-cert, --tls-key)")
        if self.allowed_names is not None and self.tls_client_ca is None:
            raise ValueError("allowed_names needs tls_client_ca (--tls-client-ca): without it no name is verified")
        if (self.tls_client_ca is not None or self.allowed_names is not None) and TLS not in schemes:
            raise ValueError("tls_client_ca and allowed_names apply to tls:// listeners, and none is given")

    @property
    def verifies_clients(self) -> bool:
        """Whether TLS clients must present a certificate the client CA signed (mutual TLS)."""
        return self.tls_client_ca is not None

    def admits_names(self, names: tuple[str, ...]) -> bool:
        """Whether a TLS peer whose verified certificate carries ``names`` (CN, DNS and URI SANs) may connect."""
        if self.allowed_names is None:
            return True
        return any(name in self.allowed_names for name in names)

    def admits(self, uid: int, gid: int) -> bool:
        """Whether a peer with these credentials may connect."""
        if self.allowed_uids is None and not self.allowed_gids:
            return True
        return uid in (self.allowed_uids or ()) or gid in self.allowed_gids

    def admits_address(self, host: str) -> bool:
        """Whether a TCP peer at ``host`` (an IP address) may connect."""
        ip = ipaddress.ip_address(host.partition("%")[0])
        if ip.version == 6 and ip.ipv4_mapped is not None:  # a v4 peer of a dual-stack listener
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks)

    def type_allowed(self) -> np.ndarray:
        """One byte per TLV type, 1 where this domain carries it: the scan's table."""
        allowed = np.zeros(256, dtype=np.uint8)
        for lo, hi in self.tlv_ranges + ((protocol.VENDOR_TLV_RANGE,) if self.vendor_types else ()):
            allowed[lo : hi + 1] = 1
        return allowed

    def record_types(self) -> tuple[int, ...]:
        """The TLV types this domain carries that have a record layout (``core.records``): what it can decode."""
        allowed = self.type_allowed()
        return tuple(t for t in records.LAYOUTS if allowed[t])

    def version_allowed(self) -> np.ndarray:
        """One byte per header version, 1 where this relay accepts it: the scan's table."""
        allowed = np.zeros(256, dtype=np.uint8)
        allowed[list(self.versions)] = 1
        return allowed

    @property
    def verifies_checksums(self) -> bool:
        """Whether any checksum is ever verified: the publishers of a domain that does compute them."""
        return self.checksum != CHECKSUM_OFF


@dataclass
class MarketDataLogic(RelayLogic):
    """Trades, quotes and books (types 1..19): speed first, so checksums are not checked."""

    name: ClassVar[str] = "market_data"
    domain_id: int = protocol.MARKET_DATA
    tlv_ranges: tuple[tuple[int, int], ...] = protocol.DOMAIN_TLV_RANGES[protocol.MARKET_DATA]
    checksum: str = CHECKSUM_OFF
    max_payload: int = 1 * MiB
    slow_policy: str = DISCONNECT


@dataclass
class SignalLogic(RelayLogic):
    """Strategy signals (20..39, 60..79): a zero checksum is "not computed", as Torq's fast path writes."""

    name: ClassVar[str] = "signal"
    domain_id: int = protocol.SIGNAL
    tlv_ranges: tuple[tuple[int, int], ...] = protocol.DOMAIN_TLV_RANGES[protocol.SIGNAL]
    checksum: str = CHECKSUM_IF_SET
    max_payload: int = 32 * KiB
    slow_policy: str = DISCONNECT
    buffer_size: int = 1 * MiB
    log_size: int = 16 * MiB
    max_connections: int = 1000


@dataclass
class ExecutionLogic(RelayLogic):
    """Orders and fills (40..59): checksums required, nothing dropped for a slow reader, everything journaled."""

    name: ClassVar[str] = "execution"
    domain_id: int = protocol.EXECUTION
    tlv_ranges: tuple[tuple[int, int], ...] = protocol.DOMAIN_TLV_RANGES[protocol.EXECUTION]
    checksum: str = CHECKSUM_REQUIRED
    max_payload: int = 1 * MiB
    slow_policy: str = BLOCK
    allowed_uids: tuple[int, ...] | None = field(default_factory=lambda: (os.getuid(),))
    max_connections: int = 100
    journal: bool = True
    journal_on_error: str = JOURNAL_PAUSE


@dataclass
class SystemLogic(RelayLogic):
    """Torq's system and recovery records (heartbeat, snapshot, error, config, discovery, health, recovery)."""

    name: ClassVar[str] = "system"
    domain_id: int = protocol.SYSTEM
    tlv_ranges: tuple[tuple[int, int], ...] = protocol.DOMAIN_TLV_RANGES[protocol.SYSTEM]
    checksum: str = CHECKSUM_IF_SET
    max_payload: int = 32 * KiB
    buffer_size: int = 1 * MiB
    log_size: int = 16 * MiB
    max_connections: int = 1000


TCP = "tcp"
TLS = "tls"
LISTEN_SCHEMES = (TCP, TLS)


def parse_listener(address: str) -> tuple[str, str, int]:
    """``tcp://HOST:PORT`` or ``tls://HOST:PORT`` (``[::1]`` for IPv6) as ``(scheme, host, port)``; else ValueError."""
    url = urllib.parse.urlsplit(address)
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme not in LISTEN_SCHEMES or not url.hostname or port is None or url.path or url.query or url.fragment:
        raise ValueError(
            f"not a TCP listen address: {address!r} (examples: tcp://127.0.0.1:7001, tcp://[::1]:7001, "
            "tls://0.0.0.0:7443)"
        )
    return url.scheme, url.hostname, port


def parse_listen(address: str) -> tuple[str, int]:
    """``parse_listener``'s ``(host, port)``, whichever the scheme."""
    return parse_listener(address)[1:]


LOGICS: dict[str, type[RelayLogic]] = {
    cls.name: cls for cls in (MarketDataLogic, SignalLogic, ExecutionLogic, SystemLogic)
}
# Each domain's default checksum policy, by domain byte: what a journal of that domain's relay let in.
CHECKSUM_POLICY_BY_DOMAIN = {cls.domain_id: cls.checksum for cls in LOGICS.values()}


def checksum_expected(domain_id: int, checksum: int) -> bool:
    """Whether a relay of ``domain_id`` with its default policy verified a message carrying ``checksum``."""
    policy = CHECKSUM_POLICY_BY_DOMAIN.get(domain_id, CHECKSUM_OFF)
    return policy == CHECKSUM_REQUIRED or (policy == CHECKSUM_IF_SET and checksum != 0)


def logic_for(name: str, **overrides: object) -> RelayLogic:
    """The logic registered under ``name``, with any fields overridden."""
    try:
        cls = LOGICS[name]
    except KeyError:
        raise ValueError(f"unknown domain {name!r}; choose one of {', '.join(LOGICS)}") from None
    return cls(**overrides)  # type: ignore[arg-type]
