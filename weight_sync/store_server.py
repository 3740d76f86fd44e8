"""The server of a group store, run as a process of its own by the group's host (see group_store.py).

Standard library only, and started by path (`python store_server.py HOST PORT`), so it
starts in milliseconds and imports nothing of the host's. It runs beside the host's
process rather than in a thread of it: a thread would answer only when the host's
Python code lets go of the GIL, which during a busy update is every few
milliseconds at best. The secret comes on stdin (never argv, which others can
read); the server answers "ready" (or "error <why>") on stdout, then one
"refused <who and why>" line per connection it turns away, and exits when its
stdin closes (the host closed the group, or died).

The protocol: length-prefixed messages of byte strings. A client first proves the
secret (HMAC of the server's nonce), then the server proves it back; only then are
requests (set, get/wait, add, check, ...) answered.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import sys
import threading
import time

MAGIC = b"rollout-group-store/1"
HANDSHAKE_LIMIT = 1 << 10  # bytes a connection may send before it proved the secret
MESSAGE_LIMIT = 1 << 30
HANDSHAKE_TIMEOUT_S = 10.0
MAX_HANDSHAKES = 64  # connections still to prove the secret; more are closed at once


def mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"|".join(parts), hashlib.sha256).digest()


def send_message(sock: socket.socket, *parts: bytes) -> None:
    header = struct.pack(f">I{len(parts)}I", len(parts), *(len(p) for p in parts))
    sock.sendall(header + b"".join(parts))


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    data = bytearray()
    while len(data) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            sock.settimeout(left)
        chunk = sock.recv(min(n - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError("the connection was closed")
        data += chunk
    return bytes(data)


def recv_message(sock: socket.socket, limit: int, deadline: float | None = None) -> list[bytes]:
    """One message of at most `limit` bytes; `deadline` (time.monotonic()) bounds the whole of it."""
    (count,) = struct.unpack(">I", _recv_exact(sock, 4, deadline))
    if count > 64:
        raise ConnectionError(f"a message of {count} parts is not part of the protocol")
    sizes = struct.unpack(f">{count}I", _recv_exact(sock, 4 * count, deadline))
    if sum(sizes) > limit:
        raise ConnectionError(f"a message of {sum(sizes)} bytes is over the limit of {limit}")
    return [_recv_exact(sock, size, deadline) for size in sizes]


class StoreServer:
    """Rank 0's side: keys in a dict, served on exactly `host:port` to clients that prove the secret."""

    def __init__(self, host: str, port: int, secret: bytes):
        self.secret = secret
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.sock = socket.create_server((host, port), family=family, backlog=64)
        self.data: dict[bytes, bytes] = {}
        self.cond = threading.Condition()
        self.departed: list[str] = []  # ranks whose connection closed
        self._conns: set[socket.socket] = set()
        self._closed = False
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._out = threading.Lock()
        threading.Thread(target=self._accept_loop, daemon=True, name=f"group-store:{port}").start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, peer = self.sock.accept()
            except OSError:  # closed, or out of file descriptors for a moment: only the first ends the loop
                time.sleep(0.01)
                continue
            if not self._handshakes.acquire(blocking=False):  # a flood of strangers: turn the newest away
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            try:
                rank = self._admit(conn, f"{peer[0]}:{peer[1]}")
            finally:
                self._handshakes.release()
            if rank is None:
                return
            with self.cond:
                if self._closed:
                    return
                self._conns.add(conn)
            try:
                while True:
                    request = recv_message(conn, MESSAGE_LIMIT)
                    try:
                        answer = self._answer(request)
                    except (IndexError, ValueError) as exc:  # a malformed request: say so, keep serving
                        answer = [b"error", f"malformed request: {type(exc).__name__}: {exc}".encode()[:200]]
                    send_message(conn, *answer)
            except (OSError, ConnectionError, struct.error):
                pass
            finally:
                with self.cond:
                    self._conns.discard(conn)
                    if not self._closed:  # a member that leaves breaks the group: its waits end now
                        self.departed.append(rank)
                        self.cond.notify_all()

    def _admit(self, conn: socket.socket, peer: str) -> str | None:
        """The handshake: the client proves the secret for our nonce, then we prove it for theirs.
        Returns the member's rank, or None if it was refused."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S  # for the whole handshake, not per read
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        nonce = os.urandom(32)
        try:
            send_message(conn, MAGIC, nonce)
            parts = recv_message(conn, HANDSHAKE_LIMIT, deadline)
        except (OSError, ConnectionError, struct.error) as exc:
            self._refuse(conn, peer, "?", f"it did not speak the group protocol ({exc})")
            return None
        if len(parts) != 4 or parts[0] != MAGIC:
            self._refuse(conn, peer, "?", "it did not speak the group protocol (a torch TCPStore client?)")
            return None
        _, rank, their_nonce, proof = parts
        rank_text = rank.decode() if rank.isdigit() and len(rank) <= 6 else repr(rank[:16])  # never raw into a log
        if not hmac.compare_digest(proof, mac(self.secret, b"client", nonce, their_nonce, rank)):
            self._refuse(conn, peer, rank_text, "it did not prove the group secret (wrong or missing secret)")
            return None
        try:
            send_message(conn, b"ok", mac(self.secret, b"host", their_nonce, nonce))
        except OSError:
            return None
        conn.settimeout(None)
        return rank_text

    def _refuse(self, conn: socket.socket, peer: str, rank: str, why: str) -> None:
        line = f"refused a participant at {peer} claiming rank {rank}: {why}".replace("\n", " ")[:300]
        with self._out:  # one line per refusal on stdout (the host logs it); never under `cond`, so a slow
            sys.stdout.write(line + "\n")  # reader of the pipe stalls only refused connections
            sys.stdout.flush()
        try:
            send_message(conn, b"refused", why.encode())
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


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    secret = sys.stdin.buffer.readline().rstrip(b"\n")
    try:
        server = StoreServer(host, port, secret)
    except OSError as exc:
        print(f"error {exc.strerror or exc}", flush=True)
        return
    print("ready", flush=True)
    sys.stdin.buffer.read()  # until the host closes the pipe (or dies)
    server.close()


if __name__ == "__main__":
    main()
