"""A trainer in a process of its own, driven over a pipe: the other side of two-process weight-sync tests.

The child holds a `WeightSender` (on the device named at "init") and sends what the parent asks for: a saved
checkpoint's transformers model (optionally wrapped in DDP or FSDP2), a subset
of its tensors, or tensors the parent passes in. `die_after=n` makes the child
exit abruptly after packing n tensors, as a trainer killed mid-transfer.
"""

from __future__ import annotations

import copy
import functools
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


@functools.lru_cache(maxsize=4)
def _model(path: str, device: str):
    from checkpoints import load_reference

    return load_reference(Path(path)).to(device)


def _weights(spec: dict, device: str):
    if "tensors" in spec:
        return {name: tensor.to(device) for name, tensor in spec["tensors"].items()}
    if spec.get("wrap"):  # wrapping changes the model in place: a copy of its own
        return _wrap(copy.deepcopy(_model(spec["checkpoint"], device)), spec["wrap"])
    model = _model(spec["checkpoint"], device)
    if spec.get("names"):
        params = dict(model.named_parameters())
        return {name: params[name] for name in spec["names"]}
    return model


def _wrap(model, how: str):
    import torch.distributed as dist
    from weight_sync import free_port

    if not dist.is_initialized():  # the trainer's own default group, which weight sync must leave alone
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _die_after(count: int) -> None:
    import trainer_adapters.sender as sender_module

    original = sender_module.iter_tensors

    def dying(weights, dtype=None):
        for i, item in enumerate(original(weights, dtype)):
            if i == count:
                os._exit(17)
            yield item

    sender_module.iter_tensors = dying


def _serve(conn) -> None:
    import torch

    torch.set_num_threads(1)
    from trainer_adapters import TransferInitInfo, WeightSender

    sender, device = None, "cpu"
    while True:
        cmd, kwargs = conn.recv()
        try:
            if cmd == "exit":
                conn.send(("ok", None))
                return
            if cmd == "init":
                if sender is not None:
                    sender.close()
                device = kwargs.pop("device", None) or "cpu"
                sender = WeightSender(TransferInitInfo(**kwargs), device=device)
                result = None
            elif cmd == "load":  # build the weights now, so a later send starts at once
                _weights(kwargs["weights"], device)
                result = None
            else:
                die_after = kwargs.pop("die_after", None)
                if die_after is not None:
                    _die_after(die_after)
                weights = _weights(kwargs.pop("weights"), device)
                result = sender.send(weights, **kwargs).version
            conn.send(("ok", result))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            conn.send(("error", type(exc).__name__, str(exc)))


class TrainerProcess:
    """Parent-side handle: `call(cmd, **kwargs)` returns the child's result or raises TrainerError."""

    def __init__(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()

    def call(self, cmd: str, timeout: float = 120, **kwargs) -> Any:
        self.conn.send((cmd, kwargs))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"trainer process did not answer {cmd!r} within {timeout}s")
        try:
            reply = self.conn.recv()
        except (EOFError, ConnectionResetError):
            raise TrainerDied(f"trainer process exited with code {self.process.join(5) or self.process.exitcode}")
        if reply[0] == "error":
            raise TrainerError(reply[1], reply[2])
        return reply[1]

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.call("exit", timeout=10)
            except (OSError, TimeoutError, TrainerDied):
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


class TrainerError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class TrainerDied(Exception):
    pass
