"""The key-value store of one group, open only to holders of the group's secret.

torch's TCPStore answers anyone who reaches its port, on every interface, and
lists its keys; a stranger could join a weight-sync group and be handed every
tensor. This store is ours: rank 0 hosts it on exactly the address it was
given, and every connection first proves the group's secret (mutual HMAC
challenge-response: the client proves it to the host, the host to the client,
so neither a stranger nor a fake trainer gets anywhere). The secret never
travels. Refused connections get a reason and nothing else, and the host
remembers them for its own error messages. The server runs as a small process
of its own beside rank 0's (store_server.py), so it answers at once however busy
rank 0's Python threads are.

`GroupStore` is a `torch.distributed.Store`, so process groups (gloo, NCCL)
rendezvous through it too. Each client holds one connection and sends one
request at a time.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from weight_sync import store_server
from weight_sync.store_server import (HANDSHAKE_LIMIT, HANDSHAKE_TIMEOUT_S, MAGIC, MESSAGE_LIMIT, mac, recv_message,
                                      send_message)

log = logging.getLogger(__name__)
SERVER = store_server.__file__


class StoreError(RuntimeError):
    """The group's store could not be reached, refused us, timed out, or went away."""


class StoreTimeout(StoreError):
    """A wait on the store ended before its keys were set."""


class _TurnedAway(Exception):
    """The host closed a new connection before the handshake began (busy with strangers): try again."""


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface (so nothing else can reach it)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StoreHost:
    """The group's store server, run as a child process (store_server.py) on exactly `host:port`.

    Refusals it reports are logged here (warnings of this module) and kept for error messages.
    """

    def __init__(self, host: str, port: int, secret: bytes):
        self.refused: list[str] = []
        self.process = subprocess.Popen([sys.executable, "-I", "-S", SERVER, host, str(port)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE)
        self.process.stdin.write(secret + b"\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().decode().strip()
        if answer != "ready":
            self.close()
            raise StoreError(f"could not listen on {host}:{port}: {answer.removeprefix('error ') or 'no answer'}")
        threading.Thread(target=self._read_refusals, daemon=True, name=f"group-store-log:{port}").start()

    def _read_refusals(self) -> None:
        for line in self.process.stdout:
            note = line.decode(errors="replace").strip().removeprefix("refused ")
            log.warning("group store refused %s", note)
            self.refused.append(note)

    def close(self) -> None:
        """Stop the server: members waiting on keys learn at once that the group is gone."""
        if self.process.stdin and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class GroupStore(dist.Store):
    """A client of a group's store (rank 0 also hosts it); usable wherever torch wants a Store."""

    def __init__(self, host: str, port: int, secret: str, rank: int, timeout: timedelta, is_host: bool):
        super().__init__()
        self.where = f"{host}:{port}"
        self.rank = rank
        self._secret = secret.encode()
        self._timeout = timeout
        self._lock = threading.Lock()
        self.server = StoreHost(host, port, self._secret) if is_host else None
        try:
            self.sock = self._connect(host, port)
        except BaseException:
            if self.server is not None:
                self.server.close()
            raise

    def _connect(self, host: str, port: int) -> socket.socket:
        """Connect and do the handshake, retrying until the timeout while nobody listens yet or the host
        closes the connection before the handshake (it turns connections away while strangers flood it)."""
        deadline = time.monotonic() + self._timeout.total_seconds()
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=max(0.05, deadline - time.monotonic()))
            except OSError as exc:
                problem = f"nobody accepted a connection at {self.where} ({exc.strerror or exc})"
            else:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    self._handshake(sock, time.monotonic() + min(HANDSHAKE_TIMEOUT_S, self._timeout.total_seconds()))
                    return sock
                except _TurnedAway:
                    problem = f"the service at {self.where} closed every connection before the handshake"
                    sock.close()
                except BaseException:
                    sock.close()
                    raise
            if time.monotonic() >= deadline:
                raise StoreError(f"{problem}; gave up after {self._timeout.total_seconds():g}s") from None
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _handshake(self, sock: socket.socket, deadline: float) -> None:
        try:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            first = recv_message(sock, HANDSHAKE_LIMIT, deadline)
        except ConnectionError:
            raise _TurnedAway() from None
        except (OSError, ValueError, struct.error) as exc:
            raise StoreError(f"the service at {self.where} is not a group store of this project ({exc})") from None
        try:
            magic, nonce = first
            if magic != MAGIC:
                raise ConnectionError("wrong protocol")
            ours = os.urandom(32)
            rank = str(self.rank).encode()
            send_message(sock, MAGIC, rank, ours, mac(self._secret, b"client", nonce, ours, rank))
            verdict, detail = recv_message(sock, HANDSHAKE_LIMIT, deadline)
        except socket.timeout:
            raise StoreError(f"the service at {self.where} accepted the connection but did not finish the "
                             f"group handshake in time (overloaded, or not a group store)") from None
        except (OSError, ConnectionError, ValueError, struct.error) as exc:
            raise StoreError(f"the service at {self.where} is not a group store of this project ({exc})") from None
        if verdict == b"refused":
            raise StoreError(f"the group store at {self.where} refused rank {self.rank}: {detail.decode()}; "
                             f"every member needs the secret of the trainer's TransferInitInfo / TensorParallelInit")
        if verdict != b"ok" or not hmac.compare_digest(detail, mac(self._secret, b"host", ours, nonce)):
            raise StoreError(f"the service at {self.where} did not prove the group secret: it is not this "
                             f"group's host (wrong address, or a different group)")

    def _call(self, *parts: bytes, wait_s: float = 0.0) -> list[bytes]:
        """Send one request and read its answer; a host that goes silent (frozen, or its machine gone without
        closing the connection) is given up on `wait_s` + the group's timeout after the request."""
        limit = wait_s + self._timeout.total_seconds()
        with self._lock:
            try:
                self.sock.settimeout(limit)
                send_message(self.sock, *parts)
                reply = recv_message(self.sock, MESSAGE_LIMIT)
            except socket.timeout:
                raise StoreError(f"no answer from the group store at {self.where} within {limit:g}s "
                                 f"(its host is frozen or unreachable)") from None
            except (OSError, ConnectionError, struct.error) as exc:
                raise StoreError(f"lost the connection to the group store at {self.where} "
                                 f"(its host closed the group or exited: {exc})") from None
        if reply[0] == b"error":
            raise StoreError(f"the group store at {self.where} refused a request: {reply[1].decode()}")
        return reply

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
        reply = self._call(b"wait", str(timeout.total_seconds()).encode(), *keys, wait_s=timeout.total_seconds())
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
