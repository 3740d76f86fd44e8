"""Who may join a group: the group store binds only its address and admits only holders of the secret.

Transport-independent (the store carries every backend's rendezvous), so tested over gloo on CPU.
"""

import logging
import os
import signal
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from checkpoints import load_reference
from rollout import TransferInitInfo, WeightTransferError, run_together
from sync_helpers import engine_for, greedy
from trainer_adapters import WeightSender
from weight_sync import free_port, new_secret
from weight_sync.channel import Channel
from weight_sync.group_store import MAGIC, GroupStore, StoreError
from weight_sync.join import open_transport
from worker.parallel import TensorParallel, TensorParallelInit


def raw_tcpstore_client(port: int) -> str:
    """What torch's own TCPStore client (the attacker of the issue) gets from the group's port."""
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=1),
                              wait_for_workers=False)
        return store.get("weight_sync/joined/0").decode()
    except Exception as exc:  # noqa: BLE001 - the test wants it to fail, whatever the kind
        return f"refused: {type(exc).__name__}"


def test_stranger_with_the_port_but_no_secret_gets_nothing(old_and_new, caplog):
    old, new, _, expected_new = old_and_new
    info = TransferInitInfo.local("gloo", timeout_s=20)
    secret = info.secret.get_secret_value()
    engine = engine_for(old)
    stranger_info = info.model_copy(update={"secret": new_secret()})
    attempts = {}

    def engine_side():
        attempts["tcpstore"] = raw_tcpstore_client(info.master_port)
        with pytest.raises(WeightTransferError, match="refused rank 1: it did not prove the group secret") as err:
            Channel(stranger_info, rank=1)
        attempts["wrong secret"] = str(err.value)
        with pytest.raises(OSError):  # the store listens on 127.0.0.1 only, not on every address of the host
            socket.create_connection(("127.0.0.2", info.master_port), timeout=2).close()
        engine.init_weight_transfer(info)

    with caplog.at_level(logging.WARNING, logger="weight_sync.group_store"):
        sender, _ = run_together(lambda: WeightSender(info), engine_side)
    try:
        run_together(lambda: sender.send(load_reference(new), version=1, bucket_bytes=8192),
                     lambda: engine.update_weights())
    finally:
        sender.close()
    assert attempts["tcpstore"].startswith("refused")
    deadline = time.monotonic() + 10  # the server reports refusals to this process as they happen
    while len(sender._sender.channel.group_store.server.refused) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert greedy(engine) == expected_new  # the legitimate member was served as usual
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("claiming rank 1: it did not prove the group secret" in r for r in refusals)
    assert any("did not speak the group protocol" in r for r in refusals)
    everything_said = " ".join(refusals) + attempts["wrong secret"] + repr(info) + str(info) + info.model_dump_json()
    assert secret not in everything_said and secret[:8] not in everything_said


def test_wrong_secret_is_a_clear_error_on_both_sides():
    info = TransferInitInfo.local("gloo", timeout_s=2)
    engine_info = info.model_copy(update={"secret": new_secret()})
    outcome = {}

    def side(name, call):
        def run():
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - inspected below
                outcome[name] = exc
        return run

    run_together(side("trainer", lambda: WeightSender(info)), side("engine", lambda: Channel(engine_info, rank=1)))
    assert isinstance(outcome["engine"], WeightTransferError)
    assert "did not prove the group secret" in str(outcome["engine"])
    trainer_error = str(outcome["trainer"])
    assert isinstance(outcome["trainer"], WeightTransferError)
    assert "rank(s) [1]" in trainer_error and "did not join within 2s" in trainer_error
    assert "refused 1 connection(s)" in trainer_error and "claiming rank 1" in trainer_error


def test_a_fake_host_is_not_trusted():
    """A service on the port that does not know the secret cannot pose as the trainer (no weights from it)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def impostor():
        conn, _ = listener.accept()
        with conn:
            from weight_sync.store_server import recv_message, send_message

            send_message(conn, MAGIC, b"n" * 32)
            recv_message(conn, 1024)
            send_message(conn, b"ok", b"x" * 32)  # claims to accept, but cannot prove the secret
            time.sleep(1)

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    with pytest.raises(StoreError, match="did not prove the group secret: it is not this group's host"):
        GroupStore("127.0.0.1", port, new_secret().get_secret_value(), 1, timedelta(seconds=5), is_host=False)
    listener.close()


def test_tensor_parallel_rank_with_a_wrong_secret_is_refused():
    port = free_port()
    inits = [TensorParallelInit(rank=r, size=2, master_port=port, timeout_s=2, secret=new_secret()) for r in range(2)]
    outcome = {}

    def join(rank):
        def run():
            try:
                TensorParallel.join(inits[rank], torch.device("cpu"))
            except Exception as exc:  # noqa: BLE001 - inspected below
                outcome[rank] = exc
        return run

    run_together(join(0), join(1))
    assert "refused rank 1: it did not prove the group secret" in str(outcome[1])
    assert "rank(s) [1] of the tensor-parallel group did not join" in str(outcome[0])
    assert "claiming rank 1" in str(outcome[0])


def test_secrets_must_be_long_and_are_not_shown_in_errors():
    with pytest.raises(ValueError) as err:
        TransferInitInfo(backend="gloo", master_port=5000, secret="hunter2-short")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ValueError):
        TensorParallelInit(rank=0, size=2, master_port=5000)  # every rank must be given the group's secret


def listening_sockets(pid="self") -> set[tuple[str, str]]:
    """(inode, address) of a process's listening TCP sockets, IPv4 and IPv6 (from /proc, Linux)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/{pid}/net/{table}") as rows:
            for line in list(rows)[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                    raw = bytes.fromhex(fields[1].split(":")[0])
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per-word byte order
                    found.add((fields[9], socket.inet_ntop(family, words)))
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/net/tcp"), reason="reads Linux's socket table")
def test_a_loopback_group_listens_on_loopback_only():
    before = listening_sockets()
    info = TransferInitInfo.local("gloo", timeout_s=20)
    ends = run_together(lambda: open_transport(info, 0, torch.device("cpu")),
                        lambda: open_transport(info, 1, torch.device("cpu")))
    try:
        opened = {address for _, address in listening_sockets() - before}
        assert opened == {"127.0.0.1"}  # gloo's own sockets; nothing on 0.0.0.0 or the host's address
        store = {address for _, address in listening_sockets(ends[0].channel.group_store.server.process.pid)}
        assert store == {"127.0.0.1"}  # the store's process
    finally:
        for end in ends:
            end.close()


def test_a_taken_port_is_a_clear_error_for_the_trainer():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        info = TransferInitInfo(backend="gloo", master_port=taken.getsockname()[1], timeout_s=5)
        with pytest.raises(WeightTransferError, match=r"rank 0 could not join .* could not listen on 127.0.0.1:\d+: "
                                                      r"Address already in use"):
            WeightSender(info)


def host_and_member(timeout_s: float):
    secret, port = new_secret().get_secret_value(), free_port()
    timeout = timedelta(seconds=timeout_s)
    host = GroupStore("127.0.0.1", port, secret, 0, timeout, is_host=True)
    return host, GroupStore("127.0.0.1", port, secret, 1, timeout, is_host=False)


def test_a_malformed_request_is_answered_and_the_group_keeps_working():
    host, member = host_and_member(10)
    try:
        with pytest.raises(StoreError, match="malformed request"):
            member._call(b"add", b"counter", b"not a number")
        with pytest.raises(StoreError, match="malformed request"):
            member._call(b"set", b"only a key")
        member.set("k", "v")
        assert host.get("k") == b"v" and member.add("n", 3) == 3 and host.add("n", 4) == 7
    finally:
        member.close()
        host.close()


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="freezes the store's process with SIGSTOP")
def stop_process(pid: int) -> None:
    """SIGSTOP `pid` and wait until every thread of it is stopped (the signal's effect is not immediate)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    tasks = Path(f"/proc/{pid}/task")
    while not all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for t in tasks.iterdir()):
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.01)


def test_a_frozen_host_is_given_up_on():
    host, member = host_and_member(1)
    stop_process(host.server.process.pid)
    try:
        with pytest.raises(StoreError, match="no answer from the group store .* within 1s"):
            member.set("k", "v")
        with pytest.raises(StoreError, match="no answer from the group store .* within 3s"):
            member.wait(["k"], timedelta(seconds=2))
    finally:
        os.kill(host.server.process.pid, signal.SIGCONT)
        member.close()
        host.close()


def test_a_flood_of_silent_strangers_delays_but_does_not_stop_a_member():
    secret, port = new_secret().get_secret_value(), free_port()
    host = GroupStore("127.0.0.1", port, secret, 0, timedelta(seconds=30), is_host=True)
    strangers = [socket.create_connection(("127.0.0.1", port)) for _ in range(80)]  # they never answer
    try:
        member = GroupStore("127.0.0.1", port, secret, 1, timedelta(seconds=30), is_host=False)
        member.set("k", "v")
        assert host.get("k") == b"v"
        member.close()
    finally:
        for sock in strangers:
            sock.close()
        host.close()
