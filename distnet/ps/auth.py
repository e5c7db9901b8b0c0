"""Who may talk to a parameter server: CURVE keys, the ZAP handler, the bind policy.

ZeroMQ's CURVE mechanism encrypts every frame and proves both ends' identities:
the server holds a secret key, each worker a key pair of its own plus the
server's public key. Which workers get in is decided by a ZAP handler (ZeroMQ's
authentication hook, one per context) that accepts only the public keys listed
in a directory. Key files are the ``zmq.auth`` certificate format, laid out by
``distnet keygen --dir DIR``:

    DIR/server.key              the server's public key: copy to every worker host
    DIR/server.key_secret       the server's key pair: the server host only
    DIR/clients/NAME.key        a worker's public key: the server accepts these
    DIR/clients/NAME.key_secret a worker's key pair: that worker's host only

``ServerKeys.from_dir(DIR)`` and ``ClientKeys.from_dir(DIR, NAME)`` read them;
``transport.make_socket`` applies them. Without keys a server may only listen
on a local address (``check_bind_address``): an open port on a network would let
anyone read and overwrite the parameters.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85

log = logging.getLogger("distnet.ps.auth")
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
ZAP_DOMAIN = "distnet"
_LOCAL_HOSTS = ("localhost",)
# contexts with a running ZapHandler: a CURVE server socket anywhere else would accept
# every client key, because libzmq lets everyone in when no ZAP handler is bound
_GUARDED: weakref.WeakKeyDictionary[zmq.Context, ZapHandler] = weakref.WeakKeyDictionary()


class SecurityError(RuntimeError):
    """Keys are missing or unreadable, or an address may not be used without them."""


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise SecurityError(f"key file not found: {path} (create keys with `distnet keygen "
                            f"--dir {path.parent}`)")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"{path}: not a ZeroMQ certificate: {exc}") from None
    if secret and not secret_key:
        raise SecurityError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret_key


@dataclass(frozen=True)
class ServerKeys:
    """The server's key pair and the workers' public keys it accepts (z85 bytes)."""

    public: bytes
    secret: bytes
    allowed: frozenset[bytes]
    source: str = ""

    @classmethod
    def from_dir(cls, keys_dir: str | Path) -> ServerKeys:
        """``DIR/server.key_secret`` and every ``DIR/clients/*.key``."""
        root = Path(keys_dir)
        public, secret = _load(root / "server.key_secret", secret=True)
        clients = root / "clients"
        allowed = frozenset(_load(p, secret=False)[0] for p in sorted(clients.glob("*.key")))
        if not allowed:
            raise SecurityError(f"no client public keys in {clients}/*.key: no worker could "
                                f"connect (run `distnet keygen --dir {root} --clients N`)")
        return cls(public, secret or b"", allowed, str(root))


@dataclass(frozen=True)
class ClientKeys:
    """A worker's key pair and the server's public key (z85 bytes)."""

    public: bytes
    secret: bytes
    server_public: bytes
    name: str = ""

    @classmethod
    def from_dir(cls, keys_dir: str | Path, name: str) -> ClientKeys:
        """``DIR/clients/NAME.key_secret`` (or ``DIR/NAME.key_secret``) and ``DIR/server.key``."""
        root = Path(keys_dir)
        pair = root / "clients" / f"{name}.key_secret"
        if not pair.is_file() and (root / f"{name}.key_secret").is_file():
            pair = root / f"{name}.key_secret"  # a worker host holding only its own files
        public, secret = _load(pair, secret=True)
        server_public, _ = _load(root / "server.key", secret=False)
        return cls(public, secret or b"", server_public, name)


def server_keys(security: ServerKeys | str | Path | None) -> ServerKeys | None:
    """``security`` as ServerKeys: a keys directory is read with ``ServerKeys.from_dir``."""
    if security is None or isinstance(security, ServerKeys):
        return security
    if isinstance(security, (str, Path)):
        return ServerKeys.from_dir(security)
    return security  # anything else: make_socket says what it accepts


def client_keys(security: ClientKeys | str | Path | None, worker_id: int,
                name: str | None = None) -> ClientKeys | None:
    """``security`` as ClientKeys: a keys directory is read for ``name`` (``worker<id>``)."""
    if isinstance(security, (str, Path)):
        return ClientKeys.from_dir(security, name or f"worker{worker_id}")
    return security


# ---- the ZAP handler --------------------------------------------------------------------
class ZapHandler:
    """Answers ZeroMQ's authentication requests for one context, in a small thread.

    Accepts a CURVE client only when its public key is in ``allowed``. Counts what it
    accepted and refused (the server reports both in its stats). Bound in the
    constructor, so it is in place before any server socket of the context binds.
    """

    def __init__(self, context: zmq.Context, allowed: frozenset[bytes]) -> None:
        self.allowed = frozenset(zmq.utils.z85.decode(k) for k in allowed)
        self.accepted = self.refused = 0
        self.last_refused = ""
        self._sock = context.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ps-zap", daemon=True)
        self._thread.start()
        _GUARDED[context] = self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._sock.poll(100):  # a bounded wait: stop() is noticed within 0.1 s
                    self._sock.send_multipart(self._answer(self._sock.recv_multipart()))
        finally:
            self._sock.close()

    def _answer(self, request: list[bytes]) -> list[bytes]:
        version, request_id = request[0], request[1] if len(request) > 1 else b""
        address = request[3].decode("ascii", "replace") if len(request) > 3 else "?"
        mechanism = request[5] if len(request) > 5 else b""
        key = request[6] if len(request) > 6 else b""
        if version == b"1.0" and mechanism == b"CURVE" and key in self.allowed:
            self.accepted += 1
            return [b"1.0", request_id, b"200", b"OK", zmq.utils.z85.encode(key), b""]
        self.refused += 1
        self.last_refused = f"{mechanism.decode('ascii', 'replace')} client at {address}"
        log.warning("refused a %s", self.last_refused)
        return [b"1.0", request_id, b"400", b"unknown key", b"", b""]

    def stop(self, timeout: float = 2.0) -> bool:
        """End the thread (it closes its socket); False if it did not end in ``timeout``."""
        self._stop.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()


def guarded(context: zmq.Context) -> bool:
    """True when ``context`` has a running ZapHandler."""
    handler = _GUARDED.get(context)
    return handler is not None and not handler._stop.is_set()


def apply_keys(sock: zmq.Socket, keys: ServerKeys | ClientKeys, *, server: bool) -> None:
    """Set the CURVE options of ``sock`` (before bind/connect)."""
    if server:
        if not isinstance(keys, ServerKeys):
            raise SecurityError(f"a server socket needs ServerKeys, got {type(keys).__name__}")
        if not guarded(sock.context):
            raise SecurityError("a CURVE server socket needs a ZapHandler on its context "
                                "(without one libzmq would accept any client key)")
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()
    else:
        if not isinstance(keys, ClientKeys):
            raise SecurityError(f"a client socket needs ClientKeys, got {type(keys).__name__}")
        sock.curve_serverkey = keys.server_public
        sock.curve_publickey = keys.public
        sock.curve_secretkey = keys.secret


# ---- where a server may listen --------------------------------------------------------
def is_local_address(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address (127.0.0.0/8, ::1,
    localhost): nothing outside this machine can reach them."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp" or not rest:
        return False
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    host = host.split(";")[-1].strip("[]")  # "src;dst" and "[::1]" forms
    if host in _LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a host name: may face the network
        return False


def check_bind_address(address: str, *, secure: bool, allow_insecure: bool = False) -> None:
    """Refuse to listen beyond this machine without CURVE keys (SecurityError says how)."""
    if secure or allow_insecure or is_local_address(address):
        return
    raise SecurityError(
        f"refusing to listen on {address} without authentication: anyone who can reach it "
        "could read and overwrite the parameters. Create keys with `distnet keygen --dir "
        "cluster/keys --clients N` and start the server with them (ParameterServer("
        "security='cluster/keys'), `distnet serve --keys cluster/keys`; workers: PSClient("
        "security='cluster/keys')), or bind 127.0.0.1 / ipc:// instead.")
