"""How a node is reached and how it listens: the shared token, deadlines, TLS (and mutual TLS), message sizes."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

from edgellm.errors import ConfigError
from edgellm.net.messages import MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class TlsFiles:
    """PEM files. A server uses cert+key (and ca to check client certs when `client_auth`); a client uses ca to
    check the server, and cert+key to identify itself under mutual TLS."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    client_auth: bool = False
    server_name: str | None = None  # override the name checked in the server certificate


@dataclass(frozen=True)
class ChannelConfig:
    """How to reach nodes: shared token, per-call deadline, TLS, message size cap."""

    token: str | None = None
    deadline_s: float = 30.0
    tls: TlsFiles | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if not self.deadline_s > 0:
            raise ConfigError(f"deadline must be > 0 s, got {self.deadline_s}")


def grpc_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]


# A node that died and came back is dialled again within 250 ms (gRPC's default backoff grows to 120 s), so a
# replica rejoins promptly and a peer's channel to it is never stale for long (`edgellm.failover`).
RECONNECT_MAX_MS = 250
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
             ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS)]  # fmt: skip


def open_channel(address: str, channel: ChannelConfig) -> grpc.Channel:
    options = [*grpc_options(channel.max_message_bytes), *RECONNECT]
    tls = channel.tls
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls.ca),
        private_key=read_pem(tls.key) if tls.client_auth else None,
        certificate_chain=read_pem(tls.cert) if tls.client_auth else None,
    )
    if tls.server_name:
        options = [*options, ("grpc.ssl_target_name_override", tls.server_name)]  # type: ignore[list-item]
    return grpc.secure_channel(address, credentials, options=options)


def read_pem(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read TLS file {path}: {exc.strerror}") from exc


def is_loopback_address(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or 0.0.0.0 / [::]: every interface


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    if tls.cert is None or tls.key is None:
        raise ConfigError("a TLS server needs both cert and key")
    return grpc.ssl_server_credentials(
        [(read_pem(tls.key), read_pem(tls.cert))],
        root_certificates=read_pem(tls.ca) if tls.client_auth else None,
        require_client_auth=tls.client_auth,
    )
