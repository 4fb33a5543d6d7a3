"""Certificates for the TLS tests (``trustme``), and the TLS listeners a relay reports."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import trustme

from support.relays import RelayProcess

LISTENING = re.compile(r"relay listening on tls://(\S+):(\d+)$")
CLIENT_NAME = "oms.prod"  # the name the relays of these tests admit


@dataclass
class Certificates:
    """PEM files in one folder: the CA, the relay's, an admitted client's, a stranger's of the same CA, another CA's."""

    ca: Path
    relay: Path  # certificate chain and key in one file, for 127.0.0.1 and localhost
    client: Path  # CN oms.prod
    stranger: Path  # CN intruder, signed by the same CA
    other_ca_client: Path  # CN oms.prod, signed by a CA the relay does not trust
    other_ca: Path


def make_certificates(folder: Path) -> Certificates:
    """A CA, the relay's certificate and three client certificates, written to ``folder``."""
    ca, other = trustme.CA(), trustme.CA()
    files = Certificates(
        *(folder / f"{name}.pem" for name in ("ca", "relay", "client", "stranger", "other", "other-ca"))
    )
    ca.cert_pem.write_to_path(files.ca)
    other.cert_pem.write_to_path(files.other_ca)
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(files.relay)
    ca.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME).private_key_and_cert_chain_pem.write_to_path(files.client)
    ca.issue_cert("intruder", common_name="intruder").private_key_and_cert_chain_pem.write_to_path(files.stranger)
    other.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME).private_key_and_cert_chain_pem.write_to_path(
        files.other_ca_client
    )
    return files


def tls_address(relay: RelayProcess) -> tuple[str, int]:
    """The first TLS listener the relay reported, as (host, port)."""
    for line in relay.lines:
        match = LISTENING.search(line)
        if match:
            return match.group(1).strip("[]"), int(match.group(2))
    raise AssertionError(f"the relay reported no TLS listener:\n{relay.stderr}")
