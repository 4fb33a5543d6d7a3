"""What ``jitrelay bridge`` is told, and every default it has.

This module is the one place the bridge's defaults are written: the command
line (``jitrelay.cli``) reads them from these dataclasses for its own
defaults and help. The carrier, core NATS or JetStream, is settled here, once,
when the options are made; nothing later guesses it.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jitrelay.core.domains import logic_for
from jitrelay.core.units import MiB

SUBJECT_PREFIX = "jitrelay"
RECONNECT_BUFFER = 8 * MiB  # what nats-py holds for NATS while reconnecting; more is dropped (a gap)
SUBSCRIPTION_PENDING_BYTES = 256 * MiB  # what nats-py may hold for the callback before it drops (a gap)
_SUBJECT = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")
_NAME = re.compile(r"[^A-Za-z0-9_-]")


class CarrierKind(enum.Enum):
    """How the bridge carries a domain between hosts; chosen once, when the options are made."""

    CORE = "core"  # core NATS: at most once, every loss counted as a gap
    JETSTREAM = "jetstream"  # a replicated JetStream stream: without loss


def host_token(host: str) -> str:
    """A host name as a NATS subject token and consumer name: letters, digits, ``-`` and ``_``.

    Raises ValueError for a name with nothing left.
    """
    token = _NAME.sub("_", host)
    if not token:
        raise ValueError(f"not a host name: {host!r}")
    return token


@dataclass
class StreamSettings:
    """The stream and consumer settings the bridge creates (the first bridge to start creates the stream)."""

    replicas: int = 3
    max_age: float = 24 * 3600.0
    max_bytes: int = 1024 * MiB
    duplicate_window: float = 120.0
    max_in_flight: int = 64  # publishes awaiting acknowledgement
    max_ack_pending: int = 1024  # NATS messages a receiver holds unacknowledged
    ack_wait: float = 5.0  # seconds before the stream gives an unacknowledged message again

    def check(self) -> None:
        """Refuse settings no stream can have; raises ValueError."""
        if self.replicas < 1 or self.max_in_flight < 1 or self.max_ack_pending < 1:
            raise ValueError("replicas, publishes in flight and acknowledgements pending must be at least 1")
        if not (self.max_age > 0 and self.max_bytes > 0 and self.duplicate_window > 0):
            raise ValueError("the stream's max age, max bytes and duplicate window must be positive")


@dataclass
class BridgeOptions:
    """What ``jitrelay bridge`` is told; what is left out is filled in from the domain.

    Raises ValueError for an unknown domain, a subject one cannot publish to,
    no server, or a setting out of range.
    """

    domain: str
    servers: tuple[str, ...]
    socket_path: Path | None = None  # default: the domain's socket
    subject: str | None = None  # default: jitrelay.<domain>
    metrics_port: int | None = None
    reconnect_buffer: int = RECONNECT_BUFFER  # bytes buffered for NATS while reconnecting
    reconnect_wait: float = 0.1  # seconds between attempts on the same server
    max_payload: int | None = None  # largest message payload taken from NATS; default: the domain's
    nats_pending_limit: int = SUBSCRIPTION_PENDING_BYTES  # bytes nats-py may hold while the relay is behind
    jetstream: bool | None = None  # default: on where the domain's relay never drops (execution)
    host: str | None = None  # this host's name in the stream and its consumer's; default: the host name
    stream: StreamSettings = field(default_factory=StreamSettings)
    journal_dir: Path | None = None  # where the relay journals; default: the domain's, if it journals
    use_journal: bool | None = None  # read what to send from the journal; default: when the domain journals
    state_dir: Path | None = None  # where the JetStream bridge keeps its state file; default: the socket's folder
    hold_when_full: bool | None = None  # a full stream holds the relay back (else: a gap); default: under block
    # How the bridge proves itself to NATS and checks NATS: a credentials file (JWT and NKey seed, as ``nsc``
    # writes them) and TLS (the servers' CA; a client certificate and key where the servers verify clients).
    nats_creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    carrier: CarrierKind = field(init=False, default=CarrierKind.CORE)  # settled from ``jetstream``

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name``, for the command line; raises KeyError for a field without one."""
        for option in dataclasses.fields(cls):
            if option.name == name and option.default is not dataclasses.MISSING:
                return option.default
        raise KeyError(name)

    def __post_init__(self) -> None:
        logic = logic_for(self.domain)  # ValueError for an unknown domain
        if self.jetstream is None:
            self.jetstream = logic.slow_policy == "block"
        self.carrier = CarrierKind.JETSTREAM if self.jetstream else CarrierKind.CORE
        self.host = host_token(socket.gethostname() if self.host is None else self.host)
        if self.socket_path is None:
            self.socket_path = Path(logic.socket_path)
        if self.journal_dir is None:
            self.journal_dir = Path(self.socket_path).parent / "journal"
        if self.hold_when_full is None:
            self.hold_when_full = logic.slow_policy == "block"
        if self.use_journal is None:
            self.use_journal = bool(self.jetstream and logic.journal)
        if self.state_dir is None:
            self.state_dir = Path(self.socket_path).parent
        self.stream.check()
        if not self.servers:
            raise ValueError("no NATS server given")
        if self.subject is None:
            self.subject = f"{SUBJECT_PREFIX}.{self.domain}"
        if not _SUBJECT.fullmatch(self.subject):
            raise ValueError(f"not a NATS subject one can publish to: {self.subject!r}")
        if self.max_payload is None:
            self.max_payload = logic.max_payload
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be 0..65535, not {self.metrics_port}")
        if not self.reconnect_wait >= 0:
            raise ValueError("reconnect wait must not be negative")
        if self.nats_pending_limit < 1:
            raise ValueError("the NATS pending limit must be at least one byte")
        self._check_credentials()

    def _check_credentials(self) -> None:
        """Refuse credential and TLS files that are missing or given without their pair; ValueError."""
        given = {"--nats-creds": self.nats_creds, "--tls-ca": self.tls_ca, "--tls-cert": self.tls_cert}
        given["--tls-key"] = self.tls_key
        for flag, path in given.items():
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")

    @property
    def uses_tls(self) -> bool:
        """Whether the bridge talks TLS to NATS (``tls://`` servers, or any TLS option given)."""
        given = (self.tls_ca, self.tls_cert)
        return any(option is not None for option in given) or any(url.startswith("tls://") for url in self.servers)
