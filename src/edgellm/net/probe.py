"""Link probes through the real transport: both halves of the control channel's `echo` op.

A caller measures a link by timing a Control call `{"op": "echo", "payload": <base64>, "reply_bytes": n}`
through the link's emulation: the request is about `up_bytes` long on the wire and the answer `{"payload":
<base64 of n bytes>}` about `down_bytes` (within 3 bytes; gRPC's own framing comes on top). Timing a few sizes
each way gives the round-trip time (the intercept) and each direction's bandwidth (the slope).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from edgellm.errors import ConfigError

ECHO_LIMIT_BYTES = 16 << 20  # largest echo payload either way: a probe, not a bulk transfer


def _payload_for(wire_bytes: int, overhead: int) -> int:
    """Raw bytes whose base64 brings a JSON message of `overhead` bytes up to about `wire_bytes`."""
    return max(wire_bytes - overhead, 0) // 4 * 3


def echo_request(up_bytes: int, down_bytes: int) -> bytes:
    """The JSON of an echo request about `up_bytes` long that asks for an answer about `down_bytes` long.

    Raises:
        ConfigError: a negative size, or one over `ECHO_LIMIT_BYTES`.
    """
    for name, size in (("up_bytes", up_bytes), ("down_bytes", down_bytes)):
        if not 0 <= size <= ECHO_LIMIT_BYTES:
            raise ConfigError(f"probe {name} must be in 0..{ECHO_LIMIT_BYTES}, got {size}")
    reply_bytes = _payload_for(down_bytes, len(json.dumps({"payload": ""})))
    empty = json.dumps({"op": "echo", "payload": "", "reply_bytes": reply_bytes})
    payload = base64.b64encode(bytes(_payload_for(up_bytes, len(empty)))).decode()
    return json.dumps({"op": "echo", "payload": payload, "reply_bytes": reply_bytes}).encode()


def echo(payload: str, reply_bytes: int) -> dict[str, Any]:
    """The node's half: check the payload is base64 and answer `reply_bytes` bytes of payload (base64).

    Raises:
        ConfigError: the payload is not base64, or `reply_bytes` is negative or over `ECHO_LIMIT_BYTES`.
    """
    try:
        base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"echo payload is not base64: {exc}") from None
    if not 0 <= reply_bytes <= ECHO_LIMIT_BYTES:
        raise ConfigError(f"echo reply_bytes must be in 0..{ECHO_LIMIT_BYTES}, got {reply_bytes}")
    return {"payload": base64.b64encode(bytes(reply_bytes)).decode()}
