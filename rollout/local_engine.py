"""`LocalEngine`: the engine in this process (the step loop behind `RolloutEngine`)."""

from __future__ import annotations

import random
from contextlib import contextmanager
import threading
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence as Seq, Union

import torch
from tqdm.auto import tqdm

from rollout.config import EngineConfig
from rollout.core import EngineCore
from rollout.outputs import RolloutOutput, Sample
from rollout.pause import PAUSE_MODES, PauseMode, UpdateGate
from rollout.sampling_params import SamplingParams
from rollout.sequence import Sequence
from rollout.validation import check_requests, load_eos_token_ids, load_tokenizer
from weight_sync import TransferInitInfo, UpdateInfo
from worker.memory.report import MemoryReport
from worker.parallel import TensorParallelInit
from worker.updates import requested_version
from worker.worker import Worker

Prompt = Union[list[int], str]
def engine_config(config: Optional[EngineConfig], fields: dict) -> EngineConfig:
    """`config`, or an EngineConfig built from keyword fields (not both)."""
    if config is None:
        return EngineConfig(**fields)
    if fields:
        raise TypeError(f"pass either an EngineConfig or keyword fields, not both (got {sorted(fields)})")
    return config


class LocalEngine:
    """Generates samples with exact per-token logprobs from a Hugging Face checkpoint, in this process.

    Users build it as `RolloutEngine` (rollout/engine.py), which also picks the Ray executor.
    With `tensor_parallel_size` > 1, one engine runs in each rank's process, each given
    its `tensor_parallel` (rank, size, rendezvous): every rank runs the same requests
    and returns the same outputs.
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
        self._rng = random.Random(config.seed)
        self._next_request = 0
        self._lock = threading.Lock()  # held by whoever drives the worker: generate() or an update
        self._update_lock = threading.Lock()  # one weight update at a time
        self._gate = UpdateGate(self._lock)

    @property
    def weight_version(self) -> int:
        """Version of the weights now serving: 0 for the checkpoint's, then each update's."""
        return self.core.weight_version

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
        token_prompts, params = check_requests(prompts, sampling_params, self.tokenizer, self.vocab_size,
                                               self.max_model_len)
        with self._lock:
            self._gate.run_pending(PAUSE_MODES)
            self.worker.check_ready()
            requests = [self._add(prompt, p) for prompt, p in zip(token_prompts, params)]
            total = sum(len(seqs) for _, seqs in requests)
            with tqdm(total=total, disable=not use_tqdm, delay=1.0, desc="Generating", unit="sample") as bar:
                self._run(bar)
            return [self._output(rid, prompt, seqs) for (rid, seqs), prompt in zip(requests, token_prompts)]

    def _add(self, prompt: list[int], params: SamplingParams) -> tuple[str, list[Sequence]]:
        request_id = str(self._next_request)
        self._next_request += 1
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        return request_id, self.core.add_request(request_id, prompt, params, seed)

    def _run(self, bar) -> None:
        try:
            while self.core.has_work():
                if self._gate.pending(("keep", "abort")):
                    bar.update(self._update_between_steps())
                    continue
                bar.update(len(self.core.step()))
        except BaseException:
            self.core.abort_all()
            raise

    def _update_between_steps(self) -> int:
        """Run the queued keep / abort updates; returns how many samples ended meanwhile."""
        ended = len(self.core.drain())  # a round still on the device computes with the weights it started with
        jobs = self._gate.take(("keep", "abort"))
        if any(job.mode == "abort" for job in jobs):
            ended += self.core.abort_inflight()
        self._gate.run(jobs)
        if self.worker.missing_weights:  # the update broke: return what the requests have so far
            ended += self.core.abort_inflight()
        return ended

    def _output(self, request_id: str, prompt: list[int], seqs: list[Sequence]) -> RolloutOutput:
        return RolloutOutput(request_id=request_id, prompt_token_ids=prompt, samples=[self._sample(s) for s in seqs])

    def _sample(self, seq: Sequence) -> Sample:
        text = seq.text
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        versions = seq.weight_versions
        return Sample(
            token_ids=seq.output_ids,
            logprobs=seq.logprobs if seq.params.logprobs else None,
            top_logprobs=seq.top_logprobs if seq.params.top_logprobs else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            weight_version=versions[0] if versions else self.core.weight_version,
            token_weight_versions=versions,
            text=text,
        )

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
        requested_version(version, self.weight_version)
        items = self.worker.check_load(weights)

        def run() -> int:
            new = requested_version(version, self.weight_version)  # again: an earlier update may have landed
            self.worker.load_weights(items)
            self._serve_version(new)
            return new

        with self._update_lock:
            return self._gate.submit(run, pause_mode)

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The serving parameters in the engine's own layout (this rank's slices), copied to the CPU."""
        with self._lock:
            return self.worker.kernel_weights()

    def import_weights(self, tensors: dict[str, torch.Tensor], version: int, pause_mode: PauseMode = "wait") -> int:
        """Serve another engine's `export_weights()` (same model and parallel layout) as `version`."""

        def run() -> int:
            if version <= self.weight_version:
                raise ValueError(f"version {version} is not newer than the serving weight_version "
                                 f"{self.weight_version}")
            self.worker.load_kernel_weights(tensors)
            self._serve_version(version)
            return version

        with self._update_lock:
            return self._gate.submit(run, pause_mode)

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
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode must be one of {', '.join(PAUSE_MODES)}, got {pause_mode!r}")
        with self._update_lock:
            update = self.worker.next_update(expected, self.weight_version + 1)

            def run() -> int:
                self.worker.receive_update(update)
                self._serve_version(update.version)
                return update.version

            return self._gate.submit(run, pause_mode)

    def _serve_version(self, version: int) -> None:
        self.core.block_manager.reset_prefix_cache()
        self.core.weight_version = version

    def sleep(self, level: int = 1) -> None:
        """Give the device memory back (needs `enable_sleep_mode=True`).

        Level 1 copies the weights to pinned host memory and discards the KV cache;
        level 2 discards both (generation then refuses until a full set of weights is
        loaded). Physical memory is released; addresses are kept for `wake_up`.
        Refused while requests are in flight; sleeping again is harmless.
        """
        with self._idle("sleep"):
            if not self.config.enable_sleep_mode:
                raise RuntimeError("sleep() needs the sleepable memory pool: create the engine with "
                                   "enable_sleep_mode=True")
            self.worker.sleep(level)
            self.core.block_manager.reset_prefix_cache()

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Bring memory back at the same addresses: tags "weights", "kv_cache", or None for all.

        The RL pattern: `wake_up(["weights"])`, load new weights, then `wake_up(["kv_cache"])`.
        The prefix cache starts empty; waking what is awake is harmless.
        """
        with self._idle("wake_up"):
            self.worker.wake_up(tags)

    def memory_report(self) -> MemoryReport:
        """Arena sizes and residency, plus what else holds device memory."""
        return self.worker.memory_report()

    @contextmanager
    def _idle(self, what: str):
        """Hold the engine for a call that must run between generate() calls."""
        refused = RuntimeError(f"{what}() is refused while generate() has requests in flight; call it between "
                               f"generate() calls")
        if not self._lock.acquire(blocking=False):
            raise refused
        try:
            if self.core.has_work():
                raise refused
            yield
        finally:
            self._lock.release()

    def shutdown(self) -> None:
        """Free the model, the KV cache and the memory pool; the engine cannot be used afterwards."""
        with self._idle("shutdown"):
            self.worker.shutdown()
