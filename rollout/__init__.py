"""rollout-engine: the rollout (sampling) engine for RL post-training."""

from rollout.config import EngineConfig
from rollout.engine import RolloutEngine
from rollout.errors import InvalidRequestError, ReplicaError
from rollout.outputs import RolloutOutput, Sample
from rollout.sampling_params import SamplingParams
from weight_sync import TransferInitInfo, UpdateInfo, WeightTransferError, WeightUpdateRejected, run_together
from worker.batch import Batch, SamplingInfo, SeqChunk, StepOutput
from worker.config import WorkerConfig
from worker.errors import CheckpointError, EngineSleepingError, UnsupportedArchitectureError, WeightsInvalidError
from worker.memory.report import ArenaReport, MemoryReport

__all__ = [
    "ArenaReport",
    "Batch",
    "CheckpointError",
    "EngineConfig",
    "EngineSleepingError",
    "InvalidRequestError",
    "MemoryReport",
    "ReplicaError",
    "RolloutEngine",
    "RolloutOutput",
    "Sample",
    "SamplingInfo",
    "SamplingParams",
    "SeqChunk",
    "StepOutput",
    "TransferInitInfo",
    "UnsupportedArchitectureError",
    "UpdateInfo",
    "WeightTransferError",
    "WeightUpdateRejected",
    "WeightsInvalidError",
    "WorkerConfig",
    "run_together",
]
