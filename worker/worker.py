"""The worker: owns the device, the model, the KV cache and the model runner."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from weight_sync import Receiver, TransferInitInfo, UpdateInfo, WeightTransferError, WeightUpdateRejected
from worker.attention import get_attention_backend
from worker.config import WorkerConfig
from worker.errors import EngineSleepingError, WeightsInvalidError
from worker.loader import (check_tensors, checkpoint_files, checkpoint_headers, fill_random, iter_checkpoint,
                           load_config, named_tensors, nonfinite, report_nonfinite)
from worker.memory import MemoryPool
from worker.memory.pool import KV_CACHE, TAGS, WEIGHTS
from worker.memory.report import MemoryReport, memory_report
from worker.model_runner import ModelRunner
from worker.models.llama import CausalLM
from worker.models.registry import build_model
from worker.parallel import TensorParallel, TensorParallelInit, check_divides
from worker.steps import Batch, Round
from worker.updates import check_update, direct_target, make_apply, touched_names

CPU_KV_CACHE_BYTES = 256 << 20
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Worker:
    """One device's share of the engine: `init_device`, `load_model`, `init_cache`, `launch` / `resume`, `sleep`,
    `wake_up`.

    Parameters and KV blocks are views into the arenas of the worker's MemoryPool.
    """

    def __init__(self, config: WorkerConfig, tensor_parallel: Optional[TensorParallelInit] = None):
        size = tensor_parallel.size if tensor_parallel else 1
        if size != config.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={config.tensor_parallel_size} runs one process per rank: use executor='ray' "
                f"(or give each rank's process its TensorParallelInit(rank=..., size={config.tensor_parallel_size}"
                f", ...)); got {'none' if tensor_parallel is None else f'one of size {size}'}"
            )
        self.config = config
        self.tp_init = tensor_parallel
        self.tp = TensorParallel()
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.hf_config = None
        self.model: Optional[CausalLM] = None
        self.max_model_len = 0
        self.num_kv_blocks = 0
        self.runner: Optional[ModelRunner] = None
        self.pool: Optional[MemoryPool] = None
        self.missing_weights: set[str] = set()  # checkpoint names discarded (sleep level 2, broken update)
        self.receiver: Optional[Receiver] = None

    def init_device(self) -> None:
        name = self.config.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device={self.config.device!r} asked for, but torch sees no CUDA device")
        if name == "cuda":
            name = f"cuda:{torch.cuda.current_device()}"
        if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
            raise RuntimeError(f"device={name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
        self.device = torch.device(name)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def load_model(self) -> None:
        """Build the kernel-format model from the checkpoint's config and load its safetensors (or, with
        load_format='dummy', draw random weights)."""
        self.hf_config = load_config(Path(self.config.model))
        if self.tp_init is not None:
            hf = self.hf_config
            check_divides(self.tp_init.size, {name: getattr(hf, name) for name in (
                "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")})
            self.tp = TensorParallel.join(self.tp_init, self.device)
        self.dtype = self._resolve_dtype()
        limit = int(self.hf_config.max_position_embeddings)
        self.max_model_len = self.config.max_model_len or limit
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings={limit}")
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device("meta"):
                self.model = build_model(self.hf_config, self.max_model_len, self.tp, self.config.expert_parallel_size)
        finally:
            torch.set_default_dtype(previous)
        self.model.eval()
        self.pool = MemoryPool(self.device, sleepable=self.config.enable_sleep_mode)
        self.pool.place_parameters(self.model)
        for module in self.model.modules():
            for key, buffer in module._buffers.items():
                module._buffers[key] = buffer.to(self.device)
        if self.config.load_format == "dummy":
            fill_random(self.model, seed=self.tp.rank if self.tp is not None else 0)
            return
        files = checkpoint_files(self.config.model)
        given = checkpoint_headers(files)
        source = f"checkpoint {self.config.model}"
        self.check_weights(given, full=True, source=source)
        self.model.load_weights(iter_checkpoint(files))
        self._check_finite(set(given), source, refuse=self.config.check_finite_weights)

    def _resolve_dtype(self) -> torch.dtype:
        if self.config.dtype != "auto":
            return TORCH_DTYPES[self.config.dtype]
        if self.device.type == "cpu":
            return torch.float32
        dtype = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = TORCH_DTYPES.get(dtype)
        return dtype if dtype in TORCH_DTYPES.values() and dtype != torch.float32 else torch.bfloat16

    def check_weights(self, given: dict, full: bool, source: str) -> None:
        """Raise CheckpointError unless `given` {name: (shape, dtype)} fits the model."""
        expected = self.model.checkpoint_shapes()
        if self.model.tie_word_embeddings and "lm_head.weight" in given:
            expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
        check_tensors(expected, given, full, source, self.model.checkpoint_aliases())

    def check_load(self, weights: object) -> list[tuple[str, torch.Tensor]]:
        """`weights` ((name, tensor) pairs or a mapping) as a list, checked without touching the live weights.

        Raises CheckpointError naming every bad entry: not a (str, tensor) pair, a tensor without data, an
        unknown name, a wrong shape, a non-floating dtype, or (with `check_finite_weights`) NaN or Inf.
        """
        items = named_tensors(weights, "load_weights")
        self.check_weights({name: (tuple(t.shape), t.dtype) for name, t in items}, full=False, source="load_weights")
        if self.config.check_finite_weights:
            report_nonfinite(nonfinite(items, self.dtype), "load_weights", refuse=True)
        return items

    def load_weights(self, items: list[tuple[str, torch.Tensor]]) -> int:
        """Copy pairs returned by `check_load` into the live weights; warns if they brought NaN or Inf."""
        if WEIGHTS in self.pool.asleep():
            raise EngineSleepingError("the weights are asleep; call wake_up(tags=['weights']) before loading weights")
        touched = {covered for name, _ in items for covered in self.model.covered_names(name)}
        with self._marked_missing_on_failure(touched), torch.no_grad():
            self.model.load_weights((name, t.to(self.device)) for name, t in items)
        self.missing_weights -= touched
        if not self.config.check_finite_weights:  # otherwise check_load refused them already
            self._check_finite(touched, "load_weights", refuse=False)
        return len(items)

    def _check_finite(self, names: set[str], source: str, refuse: bool) -> None:
        """Warn about (or refuse) live weights loaded from checkpoint `names` that hold NaN or Inf (this rank's
        part, in the engine's dtype: a value too large for float16 counts)."""
        sources: dict[str, set[str]] = {}
        for name in names:
            sources.setdefault(self.model.map_name(name)[0], set()).add(name)
        params = dict(self.model.named_parameters())
        bad = nonfinite(((param, params[param]) for param in sorted(sources)), self.dtype)
        report_nonfinite([p if sources[p] == {p} else f"{p} (from {', '.join(sorted(sources[p]))})" for p in bad],
                         source, refuse)

    def kernel_weights(self) -> dict[str, torch.Tensor]:
        """This worker's parameters (kernel format, its tensor-parallel slices), copied to the CPU."""
        if WEIGHTS in self.pool.asleep() or self.missing_weights:
            raise WeightsInvalidError("the weights are asleep or not whole; there is nothing to export")
        params = dict(self.model.named_parameters())
        return {e.name: params[e.name].detach().to("cpu", copy=True) for e in self.pool.weight_layout}

    def load_kernel_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace every parameter from another worker's `kernel_weights()` (checked before any is copied)."""
        given = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
        expected = {e.name: e.shape for e in self.pool.weight_layout}
        check_tensors(expected, given, full=True, source="load_kernel_weights")
        if WEIGHTS in self.pool.asleep():
            raise EngineSleepingError("the weights are asleep; call wake_up(tags=['weights']) before loading weights")
        params = dict(self.model.named_parameters())
        with self._marked_missing_on_failure(set(self.model.checkpoint_shapes())), torch.no_grad():
            for name, tensor in tensors.items():
                params[name].data.copy_(tensor)
        self.missing_weights.clear()

    @contextlib.contextmanager
    def _marked_missing_on_failure(self, names: set[str]):
        """A copy into live weights that fails midway leaves them mixed: count `names` as missing."""
        try:
            yield
        except BaseException:
            self.missing_weights |= names
            raise

    def init_weight_transfer(self, info: TransferInitInfo, worker_index: Optional[int] = None) -> None:
        """Join a weight-transfer group as rank `info.rank_offset + worker_index` (leaving any earlier one).

        `worker_index` defaults to this worker's tensor-parallel rank.
        """
        self.close_weight_transfer()
        with self._on_device():
            self.receiver = Receiver(info, self.tp.rank if worker_index is None else worker_index, self.device)

    def close_weight_transfer(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None

    def next_update(self, expected: Optional[UpdateInfo], min_version: int) -> UpdateInfo:
        """Wait for the trainer's next update and check it; a refusal reaches the trainer too."""
        if self.receiver is None:
            raise RuntimeError("no weight-transfer group: call init_weight_transfer(info) first")
        update = self.receiver.next_update(expected)
        try:
            check_update(self.model, self.pool, update, min_version, self.tp)
        except ValueError as exc:
            self.receiver.refuse(str(exc))
        return update

    def receive_update(self, update: UpdateInfo) -> None:
        """Accept the checked update and apply it; if it breaks, its tensors count as missing."""
        if WEIGHTS in self.pool.asleep():  # slept since the update was checked
            self.receiver.refuse("the engine's weights went to sleep before the update could land; wake them first")
        names = touched_names(self.model, update, self.tp)
        try:
            with torch.no_grad(), self._on_device():
                direct = direct_target(self.pool, update) if self.receiver.transport.device == self.device else None
                self.receiver.receive(update, make_apply(self.model, update, self.tp), direct)
        except WeightUpdateRejected:
            raise  # called off before any byte moved
        except Exception as exc:
            self.missing_weights |= names
            if isinstance(exc, WeightTransferError):
                raise
            raise WeightTransferError(f"update version {update.version} broke while being applied: {exc}") from exc
        self.missing_weights -= names

    def bind_thread(self) -> None:
        """Make the worker's device current on the calling thread (the engine loop's)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _on_device(self):
        """Make the worker's device current (updates may run on another thread than the one that built it)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def init_cache(self) -> int:
        """Allocate the paged KV cache; returns the number of blocks."""
        cfg, hf = self.config, self.hf_config
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        block_shape = (2, cfg.block_size, hf.num_key_value_heads // self.tp.size, head_dim)
        per_block = hf.num_hidden_layers * torch.Size(block_shape).numel() * self.dtype.itemsize
        self.num_kv_blocks = cfg.num_kv_blocks or self._budget_bytes() // per_block
        needed = -(-self.max_model_len // cfg.block_size)
        if self.num_kv_blocks < needed:
            raise ValueError(
                f"the KV cache holds {self.num_kv_blocks} blocks of {cfg.block_size} tokens, fewer than one "
                f"sequence of max_model_len={self.max_model_len} needs ({needed}); lower max_model_len or "
                f"give the cache more memory"
            )
        shape = (hf.num_hidden_layers, 2, self.num_kv_blocks, *block_shape[1:])
        self.pool.allocate(KV_CACHE, self.num_kv_blocks * per_block)
        caches = self.pool.view(KV_CACHE, 0, shape, self.dtype)
        backend = get_attention_backend(cfg.attention_backend, self.device)
        self.runner = ModelRunner(self.model, list(caches.unbind(0)), backend, cfg.block_size)
        if self.device.type == "cuda" and backend.name == "triton" and not cfg.enforce_eager and self.tp.size == 1:
            with self._on_device():
                self.runner.capture_graphs(cfg.cuda_graph_max_batch_size, needed)
        return self.num_kv_blocks

    def _budget_bytes(self) -> int:
        if self.config.kv_cache_memory_bytes:
            return self.config.kv_cache_memory_bytes
        if self.device.type == "cpu":
            return CPU_KV_CACHE_BYTES
        free, total = torch.cuda.mem_get_info(self.device)
        budget = free - int(total * (1.0 - self.config.gpu_memory_utilization))
        if budget <= 0:
            raise RuntimeError(
                f"no device memory left for the KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
                f"gpu_memory_utilization={self.config.gpu_memory_utilization}"
            )
        return budget

    def launch(self, batch: Batch) -> Round:
        """Start the batch's step(s); the Round's `outputs()` waits for them."""
        with self._on_device():
            return self.runner.launch(batch)

    def resume(self, previous: Round, num_steps: int, tables: list[list[int]]) -> Round:
        """Queue `num_steps` more decode steps of a round's sequences behind it (see ModelRunner.resume)."""
        with self._on_device():
            return self.runner.resume(previous, num_steps, tables)

    def check_ready(self) -> None:
        """Raise unless the worker can generate: everything awake and the weights whole."""
        if self.runner is None:
            raise RuntimeError("the engine was shut down; create a new one")
        asleep = self.pool.asleep()
        if asleep:
            raise EngineSleepingError(f"the engine is asleep ({', '.join(sorted(asleep))}); call wake_up() first")
        if self.missing_weights:
            raise WeightsInvalidError(
                f"the weights are not whole: {len(self.missing_weights)} tensor(s) were discarded (sleep level 2) or "
                f"left half-written by a failed update, e.g. {sorted(self.missing_weights)[0]}; load or send "
                f"them (a full update) first"
            )

    def sleep(self, level: int) -> None:
        """Level 1: weights to host memory, KV cache discarded. Level 2: both discarded."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 (offload weights) or 2 (discard weights), got {level}")
        awake = set(TAGS) - self.pool.asleep()
        self.pool.sleep(offload=[WEIGHTS] if level == 1 else [])
        if level == 2 and WEIGHTS in awake:
            self.missing_weights = set(self.model.checkpoint_shapes())

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Map the named arenas ("weights", "kv_cache"; None = all) back at the same addresses."""
        tags = list(TAGS) if tags is None else list(tags)
        unknown = sorted(set(tags) - set(TAGS))
        if unknown:
            raise ValueError(f"unknown wake_up tags {unknown}; allowed: {list(TAGS)}")
        self.pool.wake(tags)

    def shutdown(self) -> None:
        """Drop the model and the cache, leave any transfer group and free the pool's memory."""
        self.close_weight_transfer()
        self.runner = None
        self.model = None
        if self.pool is not None:
            self.pool.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_workspaces is not None:  # the engine loop thread's cuBLAS workspaces
                clear_workspaces()
            torch.cuda.empty_cache()

    def memory_report(self) -> MemoryReport:
        return memory_report(self.pool, self.device)
