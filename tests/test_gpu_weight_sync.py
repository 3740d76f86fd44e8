"""Weight sync on GPUs: NCCL between two GPUs (`multigpu`), CUDA IPC on one (`gpu`). Run with `pytest -m "gpu or multigpu"`."""

import time

import pytest
import torch

from rollout import RolloutEngine, WeightsInvalidError, WeightTransferError
from sync_helpers import GREEDY, PROMPTS, connect, kernel_tensors, sync
from trainer_process import TrainerProcess

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def gpu_engine(path, device):
    return RolloutEngine(model=str(path), device=device, dtype="bfloat16", num_kv_blocks=64)


def greedy(engine):
    return [o.samples[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]


def check_updates(trainer, backend, engine_device, old, new):
    """Checkpoint format (many small buckets), then the whole arena in kernel format: each equals a fresh engine."""
    fresh = gpu_engine(new, engine_device)
    expected = greedy(fresh)
    engine = gpu_engine(old, engine_device)
    assert greedy(engine) != expected
    connect(trainer, engine, backend=backend, device="cuda:0")
    assert sync(trainer, engine, {"checkpoint": str(new)}, version=1, bucket_bytes=64 << 10) == [1, 1]
    assert greedy(engine) == expected
    engine = gpu_engine(old, engine_device)
    connect(trainer, engine, backend=backend, device="cuda:0")
    tensors = kernel_tensors(fresh)
    assert sync(trainer, engine, {"tensors": tensors}, version=2, format="kernel", bucket_bytes=64 << 10) == [2, 2]
    assert greedy(engine) == expected


@pytest.mark.multigpu
@two_gpus
def test_nccl_between_two_gpus(trainer, checkpoint_dir):
    check_updates(trainer, "nccl", "cuda:1", checkpoint_dir("qwen3", 0), checkpoint_dir("qwen3", 1))


@pytest.mark.gpu
def test_ipc_on_one_gpu(trainer, checkpoint_dir):
    check_updates(trainer, "ipc", "cuda:0", checkpoint_dir("llama3", 0), checkpoint_dir("llama3", 1))


@pytest.mark.multigpu
@two_gpus
def test_ipc_refuses_engine_on_another_gpu(trainer, checkpoint_dir):
    engine = gpu_engine(checkpoint_dir("qwen3", 0), "cuda:1")
    with pytest.raises(Exception, match="needs the engine on the trainer's GPU"):
        connect(trainer, engine, backend="ipc", device="cuda:0", timeout_s=10)


@pytest.mark.multigpu
@two_gpus
def test_nccl_sender_killed_midway(trainer, checkpoint_dir):
    old, new = checkpoint_dir("qwen3", 0), checkpoint_dir("qwen3", 1)
    engine = gpu_engine(old, "cuda:1")
    doomed = TrainerProcess()
    try:
        connect(doomed, engine, backend="nccl", device="cuda:0", timeout_s=5.0)
        doomed.call("load", weights={"checkpoint": str(new)})
        start = time.monotonic()
        _, received = sync(doomed, engine, {"checkpoint": str(new)}, version=1, bucket_bytes=64 << 10, die_after=7)
        elapsed = time.monotonic() - start
    finally:
        doomed.close()
    assert isinstance(received, WeightTransferError), received
    assert elapsed < 5.0 + 5.0
    with pytest.raises(WeightsInvalidError):
        engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    connect(trainer, engine, backend="nccl", device="cuda:0")
    assert sync(trainer, engine, {"checkpoint": str(new)}, version=1) == [1, 1]
    assert greedy(engine) == greedy(gpu_engine(new, "cuda:1"))
