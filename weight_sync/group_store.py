"""The key-value store of one group, open only to holders of the group's secret.

torch's TCPStore answers anyone who reaches its port, on every interface, and
lists its keys; a stranger could join a weight-sync group and be handed every
tensor. This store is ours: rank 0 hosts it on exactly the address it was
given, and every connection first proves the group's secret (mutual HMAC
challenge-response: the client proves it to the host, the host to the client,
so neither a stranger nor a fake trainer gets anywhere). The secret never
travels. Refused connections get a reason and nothing else, and the host
remembers them for its own error messages.

`GroupStore` is a `torch.distributed.Store`, so process groups (gloo, NCCL)
rendezvous through it too. Each client holds one connection and sends one
request at a time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

log = logging.getLogger(__name__)

MAGIC = b"rollout-group-store/1"
HANDSHAKE_LIMIT = 1 << 10  # bytes a connection may send before it proved the secret
MESSAGE_LIMIT = 1 << 30
HANDSHAKE_TIMEOUT_S = 10.0


class StoreError(RuntimeError):
    """The group's store could not be reached, refused us, timed out, or went away."""


class StoreTimeout(StoreError):
    """A wait on the store ended before its keys were set."""


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"|".join(parts), hashlib.sha256).digest()


def _send(sock: socket.socket, *parts: bytes) -> None:
    header = struct.pack(f">I{len(parts)}I", len(parts), *(len(p) for p in parts))
    sock.sendall(header + b"".join(parts))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError("the connection was closed")
        data += chunk
    return bytes(data)


def _recv(sock: socket.socket, limit: int) -> list[bytes]:
    (count,) = struct.unpack(">I", _recv_exact(sock, 4))
    if count > 64:
        raise ConnectionError(f"a message of {count} parts is not part of the protocol")
    sizes = struct.unpack(f">{count}I", _recv_exact(sock, 4 * count))
    if sum(sizes) > limit:
        raise ConnectionError(f"a message of {sum(sizes)} bytes is over the limit of {limit}")
    return [_recv_exact(sock, size) for size in sizes]


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface (so nothing else can reach it)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StoreServer:
    """Rank 0's side: keys in a dict, served on exactly `host:port` to clients that prove the secret."""

    def __init__(self, host: str, port: int, secret: bytes):
        self.secret = secret
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.sock = socket.create_server((host, port), family=family, backlog=64)
        self.data: dict[bytes, bytes] = {}
        self.cond = threading.Condition()
        self.refused: list[str] = []  # who was turned away, for the host's own error messages
        self.departed: list[str] = []  # ranks whose connection closed
        self._conns: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True, name=f"group-store:{port}").start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            rank = self._admit(conn, f"{peer[0]}:{peer[1]}")
            if rank is None:
                return
            with self.cond:
                if self._closed:
                    return
                self._conns.add(conn)
            try:
                while True:
                    request = _recv(conn, MESSAGE_LIMIT)
                    _send(conn, *self._answer(request))
            except (OSError, ConnectionError, struct.error):
                pass
            finally:
                with self.cond:
                    self._conns.discard(conn)
                    if not self._closed:  # a member that leaves breaks the group: its waits end now
                        self.departed.append(rank)
                        self.cond.notify_all()

    def _admit(self, conn: socket.socket, peer: str) -> Optional[str]:
        """The handshake: the client proves the secret for our nonce, then we prove it for theirs.
        Returns the member's rank, or None if it was refused."""
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        nonce = os.urandom(32)
        try:
            _send(conn, MAGIC, nonce)
            parts = _recv(conn, HANDSHAKE_LIMIT)
        except (OSError, ConnectionError, struct.error) as exc:
            self._refuse(conn, peer, "?", f"it did not speak the group protocol ({exc})")
            return None
        if len(parts) != 4 or parts[0] != MAGIC:
            self._refuse(conn, peer, "?", "it did not speak the group protocol (a torch TCPStore client?)")
            return None
        _, rank, their_nonce, proof = parts
        rank_text = rank.decode(errors="replace")
        if not hmac.compare_digest(proof, _mac(self.secret, b"client", nonce, their_nonce, rank)):
            self._refuse(conn, peer, rank_text, "it did not prove the group secret (wrong or missing secret)")
            return None
        try:
            _send(conn, b"ok", _mac(self.secret, b"host", their_nonce, nonce))
        except OSError:
            return None
        conn.settimeout(None)
        return rank_text

    def _refuse(self, conn: socket.socket, peer: str, rank: str, why: str) -> None:
        note = f"a participant at {peer} claiming rank {rank}: {why}"
        log.warning("group store refused %s", note)
        with self.cond:
            self.refused.append(note)
        try:
            _send(conn, b"refused", why.encode())
        except OSError:
            pass

    def _answer(self, request: list[bytes]) -> list[bytes]:
        op, args = request[0], request[1:]
        with self.cond:
            if op == b"set":
                self.data[args[0]] = args[1]
                self.cond.notify_all()
                return [b"ok"]
            if op == b"add":
                value = int(self.data.get(args[0], b"0")) + int(args[1])
                self.data[args[0]] = str(value).encode()
                self.cond.notify_all()
                return [b"ok", str(value).encode()]
            if op == b"compare_set":
                key, expected, desired = args
                current = self.data.get(key)
                if (current is None and expected == b"") or current == expected:
                    self.data[key] = current = desired
                    self.cond.notify_all()
                return [b"ok", current if current is not None else expected]
            if op == b"check":
                return [b"ok", b"1" if all(k in self.data for k in args) else b"0"]
            if op == b"delete":
                return [b"ok", b"1" if self.data.pop(args[0], None) is not None else b"0"]
            if op == b"num_keys":
                return [b"ok", str(len(self.data)).encode()]
            if op == b"wait":
                timeout = float(args[0])
                keys = args[1:]
                ready = lambda: all(k in self.data for k in keys)  # noqa: E731
                if self.cond.wait_for(lambda: ready() or self._closed or self.departed, timeout):
                    if ready():
                        return [b"ok", *(self.data[k] for k in keys)]
                    if self._closed:
                        return [b"closed"]
                    return [b"left", ", ".join(self.departed).encode()]
                return [b"timeout", *(k for k in keys if k not in self.data)]
        return [b"error", b"unknown operation " + op[:32]]

    def close(self) -> None:
        """Stop listening and drop every connection (clients waiting on keys get an error at once)."""
        with self.cond:
            self._closed = True
            self.cond.notify_all()
            conns = list(self._conns)
        self.sock.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class GroupStore(dist.Store):
    """A client of a group's store (rank 0 also hosts it); usable wherever torch wants a Store."""

    def __init__(self, host: str, port: int, secret: str, rank: int, timeout: timedelta, is_host: bool):
        super().__init__()
        self.where = f"{host}:{port}"
        self.rank = rank
        self._secret = secret.encode()
        self._timeout = timeout
        self._lock = threading.Lock()
        self.server: Optional[StoreServer] = None
        if is_host:
            try:
                self.server = StoreServer(host, port, self._secret)
            except OSError as exc:
                raise StoreError(f"could not listen on {self.where}: {exc.strerror or exc}") from exc
        self.sock = self._connect(host, port)

    def _connect(self, host: str, port: int) -> socket.socket:
        """Connect (retrying until the timeout: the host may not be up yet) and do the handshake."""
        start = time.monotonic()
        deadline = start + self._timeout.total_seconds()
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=max(0.05, deadline - time.monotonic()))
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise StoreError(f"nobody accepted a connection at {self.where} within "
                                     f"{self._timeout.total_seconds():g}s ({exc.strerror or exc})") from None
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            self._handshake(sock)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock

    def _handshake(self, sock: socket.socket) -> None:
        try:
            magic, nonce = _recv(sock, HANDSHAKE_LIMIT)
            if magic != MAGIC:
                raise ConnectionError("wrong protocol")
            ours = os.urandom(32)
            rank = str(self.rank).encode()
            _send(sock, MAGIC, rank, ours, _mac(self._secret, b"client", nonce, ours, rank))
            verdict, detail = _recv(sock, HANDSHAKE_LIMIT)
        except (OSError, ConnectionError, ValueError, struct.error) as exc:
            raise StoreError(f"the service at {self.where} is not a group store of this project ({exc})") from None
        if verdict == b"refused":
            raise StoreError(f"the group store at {self.where} refused rank {self.rank}: {detail.decode()}; "
                             f"every member needs the secret of the trainer's TransferInitInfo / TensorParallelInit")
        if verdict != b"ok" or not hmac.compare_digest(detail, _mac(self._secret, b"host", ours, nonce)):
            raise StoreError(f"the service at {self.where} did not prove the group secret: it is not this "
                             f"group's host (wrong address, or a different group)")

    def _call(self, *parts: bytes) -> list[bytes]:
        with self._lock:
            try:
                _send(self.sock, *parts)
                return _recv(self.sock, MESSAGE_LIMIT)
            except (OSError, ConnectionError, struct.error) as exc:
                raise StoreError(f"lost the connection to the group store at {self.where} "
                                 f"(its host closed the group or exited: {exc})") from None

    @staticmethod
    def _bytes(value) -> bytes:
        return value.encode() if isinstance(value, str) else bytes(value)

    def set(self, key, value) -> None:
        self._call(b"set", self._bytes(key), self._bytes(value))

    def get(self, key) -> bytes:
        return self._wait([self._bytes(key)], self._timeout)[0]

    def wait(self, keys, timeout: Optional[timedelta] = None) -> None:
        self._wait([self._bytes(k) for k in keys], timeout or self._timeout)

    def _wait(self, keys: list[bytes], timeout: timedelta) -> list[bytes]:
        reply = self._call(b"wait", str(timeout.total_seconds()).encode(), *keys)
        if reply[0] == b"ok":
            return reply[1:]
        if reply[0] == b"timeout":
            missing = ", ".join(k.decode(errors="replace") for k in reply[1:])
            raise StoreTimeout(f"keys not set within {timeout.total_seconds():g}s: {missing}")
        if reply[0] == b"left":
            raise StoreError(f"rank(s) {reply[1].decode()} left the group (their connection to the store closed: "
                             f"the process exited or closed the group)")
        raise StoreError(f"the group store at {self.where} was closed by its host")

    def add(self, key, amount: int) -> int:
        return int(self._call(b"add", self._bytes(key), str(int(amount)).encode())[1])

    def compare_set(self, key, expected, desired) -> bytes:
        return self._call(b"compare_set", self._bytes(key), self._bytes(expected), self._bytes(desired))[1]

    def check(self, keys) -> bool:
        return self._call(b"check", *(self._bytes(k) for k in keys))[1] == b"1"

    def delete_key(self, key) -> bool:
        return self._call(b"delete", self._bytes(key))[1] == b"1"

    def num_keys(self) -> int:
        return int(self._call(b"num_keys")[1])

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout = timeout

    def meet(self, size: int, what: str) -> None:
        """Wait until ranks 0..size-1 have all connected (each calls this once); raise StoreError naming
        who is missing and, on the host, any connection refused meanwhile."""
        self.set(f"joined/{self.rank}", "1")
        try:
            self.wait([f"joined/{r}" for r in range(size)])
        except StoreTimeout:
            missing = [r for r in range(size) if not self.check([f"joined/{r}"])]
            refused = list(self.server.refused) if self.server else []
            note = f"; the store refused {len(refused)} connection(s): " + "; ".join(refused) if refused else ""
            raise StoreTimeout(f"rank(s) {missing} of the {what} did not join within "
                               f"{self._timeout.total_seconds():g}s{note}") from None

    def close(self) -> None:
        """Leave the store; the host also stops serving it."""
        try:
            self.sock.close()
        finally:
            if self.server is not None:
                self.server.close()


def gloo_group(store: dist.Store, rank: int, size: int, timeout: timedelta, address: str) -> dist.ProcessGroup:
    """A gloo group of our own. When the group's address is loopback, gloo listens on loopback only too."""
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    device = (dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if is_loopback(address)
              else dist.ProcessGroupGloo.create_default_device())
    options._devices = [device]
    return dist.ProcessGroupGloo(store, rank, size, options)
