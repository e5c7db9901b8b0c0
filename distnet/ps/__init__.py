"""distnet.ps: a ZeroMQ parameter server (ps-lite's shape, in Python).

- ``protocol``: the wire format (msgpack header + raw array frames), validation.
- ``transport``: socket creation (the one place for options and security).
- ``codecs``: gradient compression (none, fp16, int8, topk with error feedback).
- ``sharding``: which server holds which parameter rows.
- ``server``: ``ParameterServer`` (state in ``state``, sync/async/SSP in ``consistency``).
- ``client``: ``PSClient`` with push/pull tickets, resends and reconnection (``links``).
- ``auth``: CURVE keys (``distnet keygen``), the ZAP handler, where a server may listen.
- ``checkpoint``: server checkpoints and resuming from them.

See docs/protocol.md for the messages.
"""

from distnet.ps.auth import ClientKeys, SecurityError, ServerKeys
from distnet.ps.client import Layout, PSClient, PSError, PSTimeoutError, Ticket
from distnet.ps.codecs import CODECS, Codec, build_codec
from distnet.ps.protocol import PROTOCOL_VERSION, ProtocolError
from distnet.ps.server import ParameterServer
from distnet.ps.sharding import ShardPlan, gather, plan_shards, split

__all__ = [
    "CODECS", "PROTOCOL_VERSION", "ClientKeys", "Codec", "Layout", "PSClient", "PSError",
    "PSTimeoutError", "ParameterServer", "ProtocolError", "SecurityError", "ServerKeys",
    "ShardPlan", "Ticket", "build_codec", "gather", "plan_shards", "split",
]
