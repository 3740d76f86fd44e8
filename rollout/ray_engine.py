"""`RolloutEngine(executor="ray")`: data-parallel replicas, each a tensor-parallel group of Ray actors.

Requests are validated and given seeds here, then spread over the replicas by
load (a prompt and its n samples stay on one replica), so outputs do not depend
on which replica served them. Every other call fans out to every rank. A dead
actor fails the call in progress with a ReplicaError naming its replica; the
other replicas keep serving, and `restart_replica` brings it back.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence as Seq, Union

from rollout.config import EngineConfig, engine_config
from rollout.errors import ReplicaError
from rollout.outputs import RolloutOutput
from rollout.ray_actor import RankActor
from rollout.sampling_params import SamplingParams
from rollout.requests import RequestFront
from rollout.validation import load_tokenizer
from weight_sync import UpdateInfo, new_secret
from worker.loader import load_config, named_tensors
from worker.models.registry import routed_experts_shape
from worker.updates import requested_version


RAY_OPTIONS = ("placement_group", "bundle_indices", "num_gpus_per_worker", "call_timeout_s")


def ray_executor(config: Optional[EngineConfig], fields: dict) -> Optional[tuple[EngineConfig, dict]]:
    """For `executor="ray"`: the EngineConfig and the Ray options (`RAY_OPTIONS`, taken out of `fields`) that
    an engine's constructor was given; None for the local executor."""
    executor = config.executor if config is not None else fields.get("executor", "local")
    if executor != "ray":
        return None
    options = {k: fields.pop(k) for k in RAY_OPTIONS if k in fields}
    return engine_config(config, fields), options


def ray_available() -> dict:
    import ray

    return ray.available_resources()


class RayEngine:
    """The same calls as RolloutEngine, served by `data_parallel_size` x `tensor_parallel_size` actors.

    `placement_group` / `bundle_indices` (one bundle per rank, replica-major) place
    the actors, e.g. on GPUs shared with a trainer; `num_gpus_per_worker` may be a
    fraction. Without them a placement group is created (one GPU per rank when the
    cluster has GPUs and `device` is not "cpu").
    """

    def __init__(self, config: EngineConfig, placement_group=None, bundle_indices: Optional[list[int]] = None,
                 num_gpus_per_worker: Optional[float] = None, call_timeout_s: float = 600.0,
                 actor_class: type = RankActor):
        import ray

        if not ray.is_initialized():
            ray.init()
        self.config = config
        self.dp, self.tp = config.data_parallel_size, config.tensor_parallel_size
        self.call_timeout_s = call_timeout_s
        self._actor_class = actor_class
        gpus = num_gpus_per_worker
        if gpus is None:
            gpus = 1 if config.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0
        self._gpus = gpus
        self._pg, self._bundles = self._placement(placement_group, bundle_indices)
        self.tokenizer = load_tokenizer(Path(config.model))
        hf = load_config(Path(config.model))
        self.vocab_size = int(hf.vocab_size)
        self.max_model_len = config.max_model_len or int(hf.max_position_embeddings)
        self.front = RequestFront(self.tokenizer, self.vocab_size, self.max_model_len, config.seed,
                                  routed_experts_shape(hf))
        self._lock = threading.Lock()
        self._load = [0] * self.dp
        # with tensor parallelism every rank must see a replica's calls in the same order: one at a time
        self._replica_locks = [threading.Lock() for _ in range(self.dp)]
        self.replicas: list[list[Any]] = [[] for _ in range(self.dp)]
        self.replica_versions = [0] * self.dp
        self.weight_version = 0
        self._transfer: Optional[Any] = None
        for replica in range(self.dp):
            self._start_replica(replica)

    def _placement(self, placement_group, bundle_indices):
        from ray.util.placement_group import placement_group as make_group

        count = self.dp * self.tp
        self._own_group = placement_group is None
        if placement_group is None:
            bundle = {"CPU": 1, **({"GPU": self._gpus} if self._gpus else {})}
            placement_group = make_group([dict(bundle) for _ in range(count)], strategy="PACK")
            self._wait(placement_group.ready(), f"a placement group of {count} x {bundle} (free resources: "
                                                f"{ray_available()})")
        indices = list(range(count)) if bundle_indices is None else list(bundle_indices)
        if len(indices) != count:
            raise ValueError(f"bundle_indices must name {count} bundles (data_parallel_size x "
                             f"tensor_parallel_size), got {len(indices)}")
        return placement_group, indices

    def _start_replica(self, replica: int) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote = ray.remote(self._actor_class)
        concurrency = 1000 if self._actor_class is not RankActor else 8  # async actors: concurrent streams
        actors = []
        for rank in range(self.tp):
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=self._bundles[
                replica * self.tp + rank])
            actors.append(remote.options(num_cpus=1 if not self._gpus else 0, num_gpus=self._gpus,
                                         max_concurrency=concurrency, scheduling_strategy=strategy).remote(replica, rank))
        self.replicas[replica] = actors
        tp = None
        if self.tp > 1:
            host, port = self._get(replica, actors[0].address.remote())
            group = dict(size=self.tp, master_address=host, master_port=port,
                         secret=new_secret())  # one per replica's group, handed only to its ranks
            tp = lambda r: dict(rank=r, **group)  # noqa: E731
        config = self.config.model_dump()
        versions = self._get(replica, [a.start.remote(config, tp and tp(r)) for r, a in enumerate(actors)])
        self.replica_versions[replica] = versions[0]

    def generate(self, prompts: Seq[Union[list[int], str]],
                 sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RolloutOutput]:
        """Like RolloutEngine.generate; prompts are spread over the replicas serving the current weights."""
        token_prompts, params = self.front.check(prompts, sampling_params)
        with self._lock:
            seeds = [self.front.seed(p) for p in params]
            ids = [self.front.new_id() for _ in params]
            plan = self._assign(token_prompts, params)
        outputs: list[Optional[RolloutOutput]] = [None] * len(token_prompts)
        try:
            with self._exclusive(plan):
                refs = {}
                for replica, items in plan.items():
                    args = ([token_prompts[i] for i in items], [params[i] for i in items], [seeds[i] for i in items])
                    refs[replica] = [a.generate.remote(*args) for a in self.replicas[replica]]
                for replica, items in plan.items():
                    for i, out in zip(items, self._get(replica, refs[replica], timeout=None)[0]):
                        outputs[i] = out.model_copy(update={"request_id": ids[i]})
        finally:
            with self._lock:
                for replica, items in plan.items():
                    self._load[replica] -= sum(self._cost(token_prompts[i], params[i]) for i in items)
        return outputs

    @staticmethod
    def _cost(prompt: list[int], params: SamplingParams) -> int:
        return params.n * (len(prompt) + params.max_tokens)

    def assign_one(self, prompt: list[int], params: SamplingParams) -> int:
        """The replica for one request (counted in its load until `release_one`)."""
        with self._lock:
            return self._assign([prompt], [params]).popitem()[0]

    def release_one(self, replica: int, prompt: list[int], params: SamplingParams) -> None:
        with self._lock:
            self._load[replica] -= self._cost(prompt, params)

    def _assign(self, prompts: list[list[int]], params: list[SamplingParams]) -> dict[int, list[int]]:
        """Prompt indices per replica, each prompt to the least loaded replica serving the current weights."""
        serving = [r for r in range(self.dp) if self.replicas[r] and self.replica_versions[r] == self.weight_version]
        if not serving:
            raise ReplicaError(f"no replica serves weight version {self.weight_version}: versions "
                               f"{self.replica_versions}; restart or update the replicas")
        plan: dict[int, list[int]] = {}
        order = sorted(range(len(prompts)), key=lambda i: -self._cost(prompts[i], params[i]))
        for i in order:
            replica = min(serving, key=lambda r: self._load[r])
            self._load[replica] += self._cost(prompts[i], params[i])
            plan.setdefault(replica, []).append(i)
        return {r: sorted(items) for r, items in plan.items()}

    def _get(self, replica: int, refs, timeout: Optional[float] = -1.0):
        """ray.get with a timeout, turning a dead or failing actor into a ReplicaError naming the replica."""
        import ray

        try:
            return ray.get(refs, timeout=self.call_timeout_s if timeout == -1.0 else timeout)
        except Exception as exc:  # noqa: BLE001 - translated below
            self.failed(replica, exc)
            raise

    def failed(self, replica: int, exc: Exception) -> None:
        """Raise a Ray error of `replica`'s actors as what it means: a ReplicaError for a dead or silent actor
        (whose replica is then dropped), the actor's own exception for a failed call. Returns for other errors."""
        import ray

        if isinstance(exc, ray.exceptions.RayActorError):
            for actor in self.replicas[replica]:  # its other ranks cannot go on alone
                ray.kill(actor)
            self.replicas[replica] = []
            raise ReplicaError(f"replica {replica} lost an actor ({type(exc).__name__}); the other replicas keep "
                               f"serving; restart_replica({replica}) brings it back") from exc
        if isinstance(exc, ray.exceptions.GetTimeoutError):
            raise ReplicaError(f"replica {replica} did not answer within {self.call_timeout_s}s") from exc
        if isinstance(exc, ray.exceptions.RayTaskError):
            raise exc.as_instanceof_cause() from None

    def _wait(self, ref, what: str) -> None:
        import ray

        ready, _ = ray.wait([ref], timeout=self.call_timeout_s)
        if not ready:
            raise TimeoutError(f"gave up after {self.call_timeout_s}s waiting for {what}")

    def _exclusive(self, replicas: Iterable[int]):
        """Hold the named replicas' locks (in order) when tensor parallelism needs their calls serialized."""
        if self.tp == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for replica in sorted(replicas):
            stack.enter_context(self._replica_locks[replica])
        return stack

    def fan_out(self, method: str, *args, per_rank=None, record=None, **kwargs) -> dict[int, Any]:
        """Call an engine method on every rank of every live replica; rank 0's result per replica.

        Every replica is waited for; `record(results)` sees those that succeeded
        before the first failure, if any, is raised.
        """
        live = [r for r in range(self.dp) if self.replicas[r]]
        results, errors = {}, []
        with self._exclusive(live):
            refs = {r: [a.call.remote(method, *(per_rank(r, k) if per_rank else args), **kwargs)
                        for k, a in enumerate(self.replicas[r])] for r in live}
            for r in live:
                try:
                    results[r] = self._get(r, refs[r], timeout=None if method == "update_weights" else -1.0)[0]
                except Exception as exc:  # noqa: BLE001 - raised below, after the others are in
                    errors.append(exc)
        if record is not None:
            record(results)
        if errors:
            raise errors[0]
        return results

    def sleep(self, level: int = 1) -> None:
        self.fan_out("sleep", level)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        self.fan_out("wake_up", tags)

    def memory_report(self) -> list:
        """Rank 0's MemoryReport of each live replica."""
        return list(self.fan_out("memory_report").values())

    def load_weights(self, weights: Iterable, version: Optional[int] = None, pause_mode: str = "wait") -> int:
        """Load the same checkpoint-format tensors into every rank (sent through Ray's object store)."""
        import ray

        new = requested_version(version, self.weight_version)
        self._check_pause_mode(pause_mode)
        items = ray.put(named_tensors(weights, "load_weights"))  # checked before anything is sent
        self.fan_out("load_weights", items, new, pause_mode, record=lambda done: self._set_versions(new, done))
        return new

    @property
    def num_workers(self) -> int:
        """Ranks in a weight-transfer group, besides the trainer: data_parallel_size x tensor_parallel_size."""
        return self.dp * self.tp

    def init_weight_transfer(self, init_info) -> None:
        """Join every rank to the trainer's group: replica r, rank k is worker r * tensor_parallel_size + k."""
        self.fan_out("init_weight_transfer", per_rank=lambda r, k: (init_info, r * self.tp + k))

    def update_weights(self, update_info=None, pause_mode: str = "wait") -> int:
        """Every rank receives the trainer's next update (see RolloutEngine.update_weights).

        A replica that lags (restarted with nobody to restore it from) counts as
        current again only after a full update given as `update_info`.
        """
        self._check_pause_mode(pause_mode)
        full = update_info is not None and not UpdateInfo.model_validate(update_info).partial
        results = self.fan_out("update_weights", update_info, pause_mode,
                                record=lambda done: self._set_versions(max(done.values(), default=0), done, full))
        return max(results.values())

    def _check_pause_mode(self, pause_mode: str) -> None:
        if self.tp > 1 and pause_mode != "wait":
            raise ValueError(f"pause_mode={pause_mode!r} needs tensor_parallel_size=1 for now: with tensor "
                             f"parallelism a replica's updates and generate calls take turns (pause_mode='wait')")

    def _set_versions(self, version: int, replicas: Iterable[int], full: bool = True) -> None:
        """Record `version` on the replicas that applied it (lagging ones only when the update was full)."""
        for r in replicas:
            if full or self.replica_versions[r] == self.weight_version:
                self.replica_versions[r] = version
        self.weight_version = max(self.weight_version, version)

    def restart_replica(self, replica: int) -> None:
        """Replace a replica's actors and give them the current weights.

        The weights are copied rank by rank from a replica serving the current
        version (through Ray's object store). Without one, the restarted replica
        serves the checkpoint's weights only once an update or load brings it level.
        """
        import ray

        for actor in self.replicas[replica]:
            ray.kill(actor)
        self._start_replica(replica)
        donors = [r for r in range(self.dp) if r != replica and self.replicas[r]
                  and self.replica_versions[r] == self.weight_version]
        if self.replica_versions[replica] == self.weight_version or not donors:
            return
        with self._exclusive([replica, donors[0]]):
            exports = [actor.call.remote("export_weights") for actor in self.replicas[donors[0]]]
            refs = [actor.call.remote("import_weights", exported, self.weight_version)
                    for actor, exported in zip(self.replicas[replica], exports)]
            self.replica_versions[replica] = self._get(replica, refs)[0]

    def shutdown(self) -> None:
        """Stop every actor, and free the placement group if the engine created it."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actors in self.replicas:
            for actor in actors:
                ray.kill(actor)
        self.replicas = [[] for _ in range(self.dp)]
        if self._own_group and self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
