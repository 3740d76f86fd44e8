"""rollout-engine: the rollout (sampling) engine for RL post-training."""

from rollout.async_engine import AsyncRolloutEngine
from rollout.config import EngineConfig
from rollout.engine import RolloutEngine
from rollout.errors import EngineClosedError, EnginePausedError, InvalidRequestError, ReplicaError
from rollout.outputs import PartialSample, RolloutOutput, Sample, SampleDelta
from rollout.sampling_params import SamplingParams
from weight_sync import TransferInitInfo, UpdateInfo, WeightTransferError, WeightUpdateRejected, run_together
from worker.config import WorkerConfig
from worker.errors import CheckpointError, EngineSleepingError, UnsupportedArchitectureError, WeightsInvalidError
from worker.memory.report import ArenaReport, MemoryReport

__all__ = [
    "ArenaReport",
    "AsyncRolloutEngine",
    "CheckpointError",
    "EngineClosedError",
    "EngineConfig",
    "EnginePausedError",
    "EngineSleepingError",
    "InvalidRequestError",
    "MemoryReport",
    "PartialSample",
    "ReplicaError",
    "RolloutEngine",
    "RolloutOutput",
    "Sample",
    "SampleDelta",
    "SamplingParams",
    "TransferInitInfo",
    "UnsupportedArchitectureError",
    "UpdateInfo",
    "WeightTransferError",
    "WeightUpdateRejected",
    "WeightsInvalidError",
    "WorkerConfig",
    "run_together",
]
