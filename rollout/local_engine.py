"""`LocalEngine`: the engine in this process (the engine loop behind `RolloutEngine` and `AsyncRolloutEngine`)."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence as Seq, Union

import torch
from tqdm.auto import tqdm

from rollout.config import EngineConfig, engine_config
from rollout.core import EngineCore
from rollout.loop import EngineLoop
from rollout.outputs import RolloutOutput
from rollout.pause import PauseMode, check_pause_mode
from rollout.requests import RequestFront, Sink
from rollout.sampling_params import SamplingParams
from rollout.validation import load_eos_token_ids, load_tokenizer
from weight_sync import TransferInitInfo, UpdateInfo
from worker.memory.report import MemoryReport
from worker.models.registry import routed_experts_shape
from worker.parallel import TensorParallelInit
from worker.worker import Worker

Prompt = Union[list[int], str]


class _Collect(Sink):
    """Hands one request's output (or error) of a generate() call to the waiting caller."""

    def __init__(self, index: int, results: queue.SimpleQueue):
        self.index, self.results = index, results

    def finished(self, output: RolloutOutput) -> None:
        self.results.put((self.index, output))

    def failed(self, error: BaseException) -> None:
        self.results.put((self.index, error))


class LocalEngine:
    """Generates samples with exact per-token logprobs from a Hugging Face checkpoint, in this process.

    Users build it as `RolloutEngine` (rollout/engine.py), which also picks the Ray executor.
    Its engine loop (rollout/loop.py) runs on a thread of its own; every method may be
    called from any thread. With `tensor_parallel_size` > 1, one engine runs in each
    rank's process, each given its `tensor_parallel` (rank, size, rendezvous): every
    rank runs the same requests and returns the same outputs.
    """

    def __init__(self, config: Optional[EngineConfig] = None, *,
                 tensor_parallel: Optional[TensorParallelInit] = None, **kwargs):
        config = engine_config(config, kwargs)
        self.config = config
        self.worker = Worker(config, tensor_parallel)
        self.worker.init_device()
        self.worker.load_model()
        self.worker.init_cache()
        self.tokenizer = load_tokenizer(Path(config.model))
        self.vocab_size = int(self.worker.hf_config.vocab_size)
        eos = load_eos_token_ids(Path(config.model), self.worker.hf_config)
        self.core = EngineCore(config, self.worker, eos, self.tokenizer)
        self.front = RequestFront(self.tokenizer, self.vocab_size, self.max_model_len, config.seed,
                                  routed_experts_shape(self.worker.hf_config))
        self.loop = EngineLoop(self.core, self.tokenizer)
        self._update_lock = threading.Lock()  # one weight update at a time

    @property
    def weight_version(self) -> int:
        """Version of the weights now serving: 0 for the checkpoint's, then each update's."""
        return self.core.serving.version

    @property
    def max_model_len(self) -> int:
        return self.worker.max_model_len

    def generate(
        self,
        prompts: Seq[Prompt],
        sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
        use_tqdm: bool = True,
    ) -> list[RolloutOutput]:
        """Sample completions for each prompt (token-id lists, or strings with a tokenizer).

        `sampling_params` is one SamplingParams for all prompts or one per prompt.
        Every request is checked before any work starts; outputs keep prompt order.
        A progress bar appears on calls longer than a second unless `use_tqdm=False`.
        """
        token_prompts, params = self.front.check(prompts, sampling_params)
        results: queue.SimpleQueue = queue.SimpleQueue()
        requests = [self.front.request(prompt, p, _Collect(i, results))
                    for i, (prompt, p) in enumerate(zip(token_prompts, params))]
        for request in requests:
            request.wait = False
        self.loop.add(requests)
        outputs: list[Optional[RolloutOutput]] = [None] * len(requests)
        try:
            with tqdm(total=sum(p.n for p in params), disable=not use_tqdm, delay=1.0, desc="Generating",
                      unit="sample") as bar:
                for _ in requests:
                    index, result = results.get()
                    if isinstance(result, BaseException):
                        raise result
                    outputs[index] = result
                    bar.update(len(result.samples))
        except BaseException:
            if not self.loop.closed:  # the others end now; their partial samples are dropped
                self.loop.abort([r.request_id for r in requests])
            raise
        return outputs

    def pause_generation(self, mode: PauseMode = "keep") -> None:
        """Stop generating once `mode` allows: "abort" ends the requests in flight now (finish_reason "abort"),
        "wait" lets them finish, "keep" keeps them to continue after `resume_generation()`. Requests arriving
        while paused wait. Weight updates, sleep and wake_up run at once while paused."""
        check_pause_mode(mode)
        self._wait(self.loop.pause(mode))

    def resume_generation(self) -> None:
        """Generate again: requests kept or held while paused continue."""
        self._wait(self.loop.resume())

    def _job(self, run, mode: PauseMode = "keep"):
        """Run `run` on the engine loop's thread between two steps under `mode`, and return its result."""
        return self._wait(self.loop.job(run, mode))

    @staticmethod
    def _wait(future: Future):
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted before it started: it will not run
            raise

    def load_weights(self, weights: Union[Iterable[tuple[str, torch.Tensor]], Mapping[str, torch.Tensor]],
                     version: Optional[int] = None, pause_mode: PauseMode = "wait") -> int:
        """Load checkpoint-format (Hugging Face name, tensor) pairs, or a dict of them, into the live model.

        Any subset of the model's tensors may be given. All are checked (pairs of a
        str and a tensor with data, names, shapes, floating dtype; NaN / Inf with
        `check_finite_weights`) before anything is queued or copied: a CheckpointError
        (a ValueError for a bad `version`) leaves the old weights serving. Weights
        holding NaN or Inf otherwise load with a RuntimeWarning naming them. `version`
        must be an int newer than `weight_version` (default: one more). May be called
        from another thread while generate() runs: it lands between two steps as
        `pause_mode` says ("wait", "keep" or "abort"; see the README). The prefix
        cache is cleared. Returns the new version.
        """
        serving = self.core.serving
        serving.next_version(version)
        items = self.worker.check_load(weights)

        def run() -> int:
            new = serving.next_version(version)  # again: an earlier update may have landed
            self.worker.load_weights(items)
            serving.serve(new)
            return new

        with self._update_lock:
            return self._job(run, pause_mode)

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The serving parameters in the engine's own layout (this rank's slices), copied to the CPU."""
        return self._job(self.worker.kernel_weights)

    def import_weights(self, tensors: dict[str, torch.Tensor], version: int, pause_mode: PauseMode = "wait") -> int:
        """Serve another engine's `export_weights()` (same model and parallel layout) as `version`."""

        def run() -> int:
            self.core.serving.next_version(version)
            self.worker.load_kernel_weights(tensors)
            self.core.serving.serve(version)
            return version

        with self._update_lock:
            return self._job(run, pause_mode)

    def init_weight_transfer(self, init_info: Union[TransferInitInfo, dict], worker_index: Optional[int] = None) -> None:
        """Join a weight-transfer group with a trainer (NCCL, CUDA IPC or gloo; see `TransferInitInfo`).

        Blocks until every rank has joined (at most `timeout_s`), so start the
        trainer's `WeightSender` at the same time (e.g. `weight_sync.run_together`).
        Joining again leaves the previous group. `worker_index` (default: the
        tensor-parallel rank) places this engine's worker at group rank
        `rank_offset + worker_index`.
        """
        info = TransferInitInfo.model_validate(init_info)
        with self._update_lock:
            self.worker.init_weight_transfer(info, worker_index)

    def update_weights(self, update_info: Union[UpdateInfo, dict, None] = None,
                       pause_mode: PauseMode = "wait") -> int:
        """Receive the trainer's next update over the transfer group; returns the new weight_version.

        The update the trainer announced is checked (names, shapes, dtypes, full
        coverage, version newer; and equal to `update_info` when given) before a
        byte moves; a refusal raises WeightUpdateRejected here and on the trainer,
        and the old weights keep serving. The buckets are applied between two
        generation steps as `pause_mode` says. If the transfer breaks, this raises
        WeightTransferError and generation is refused until a complete update arrives.
        """
        expected = None if update_info is None else UpdateInfo.model_validate(update_info)
        check_pause_mode(pause_mode)
        with self._update_lock:
            update = self.worker.next_update(expected, self.weight_version + 1)

            def run() -> int:
                self.worker.receive_update(update)
                self.core.serving.serve(update.version)
                return update.version

            return self._job(run, pause_mode)

    def sleep(self, level: int = 1) -> None:
        """Give the device memory back (needs `enable_sleep_mode=True`).

        Level 1 copies the weights to pinned host memory and discards the KV cache;
        level 2 discards both (generation then refuses until a full set of weights is
        loaded). Physical memory is released; addresses are kept for `wake_up`.
        Refused while requests are in flight, unless generation is paused: requests
        kept by `pause_generation("keep")` are then recomputed after `wake_up`.
        Sleeping again is harmless.
        """
        if not self.config.enable_sleep_mode:
            raise RuntimeError("sleep() needs the sleepable memory pool: create the engine with "
                               "enable_sleep_mode=True")
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 (offload weights) or 2 (discard weights), got {level}")

        def run() -> None:
            if self.core.has_work():
                if not self.loop.paused:
                    raise RuntimeError("sleep() is refused while requests are in flight; call it between "
                                       "generate() calls, or pause_generation() first")
                self.core.scheduler.preempt_all()  # their KV goes: they recompute after wake_up
            self.worker.sleep(level)
            self.core.serving.drop_cache()

        self._job(run)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Bring memory back at the same addresses: tags "weights", "kv_cache", or None for all.

        The RL pattern: `wake_up(["weights"])`, load new weights, then `wake_up(["kv_cache"])`.
        The prefix cache starts empty; waking what is awake is harmless. Requests that
        waited for the engine to wake start once everything is awake.
        """
        self._job(lambda: self.worker.wake_up(tags))

    def memory_report(self) -> MemoryReport:
        """Arena sizes and residency, plus what else holds device memory."""
        return self.worker.memory_report()

    def shutdown(self, abort: bool = False) -> None:
        """Free the model, the KV cache and the memory pool and stop the engine loop; the engine cannot be used
        afterwards. Refused while requests are in flight, unless `abort` (they end with finish_reason "abort")."""
        if self.loop.closed:
            return

        def run() -> None:
            if self.core.has_work():
                if not abort:
                    raise RuntimeError("shutdown() is refused while requests are in flight; call it between "
                                       "generate() calls, or shutdown(abort=True)")
                self.loop.end_all()
            self.worker.shutdown()

        self._job(run, "abort" if abort else "keep")
        self.loop.close()
