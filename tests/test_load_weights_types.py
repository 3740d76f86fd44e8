"""load_weights checks what it is given (pairs or a dict, str names, tensors with data, an int version, finite values
when asked) before anything is copied: a refused call leaves the engine generating what a fresh engine generates."""

import warnings

import numpy as np
import pytest
import torch

from checkpoints import make_config, randomize
from rollout import CheckpointError, RolloutEngine, SamplingParams
from transformers import AutoModelForCausalLM

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[4, 8, 15, 16, 23, 42], [99, 7, 301]]
NORM = "model.norm.weight"
UP = "model.layers.0.mlp.up_proj.weight"


def engine_for(path, **config):
    return RolloutEngine(model=str(path), device="cpu", num_kv_blocks=64, **config)


def greedy(engine):
    return [o.samples[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def trainer_weights():
    """Checkpoint-format weights of another random qwen3 model (what a trainer would send)."""
    model = AutoModelForCausalLM.from_config(make_config("qwen3"), dtype=torch.float32)
    randomize(model, seed=11)
    return dict(model.state_dict())


@pytest.fixture(scope="module")
def fresh(checkpoint_dir):
    """Greedy outputs of a fresh engine on the checkpoint."""
    return greedy(engine_for(checkpoint_dir("qwen3")))


def good(weights):
    """A valid entry listed before the bad one: a lazy check would already have copied it."""
    return (UP, weights[UP])


BAD = {
    "numpy value": (lambda w: [good(w), (NORM, w[NORM].numpy())], r"entry 1 \(model.norm.weight\): got numpy.ndarray"),
    "list value": (lambda w: [good(w), (NORM, w[NORM].tolist())], r"entry 1 \(model.norm.weight\): got list"),
    "None value": (lambda w: [good(w), (NORM, None)], r"entry 1 \(model.norm.weight\): got None"),
    "int name": (lambda w: [good(w), (7, w[NORM])], "entry 1: got a name of type int"),
    "bytes name": (lambda w: [good(w), (NORM.encode(), w[NORM])], "entry 1: got a name of type bytes"),
    "triple": (lambda w: [good(w), (NORM, w[NORM], 1)], "entry 1: got a tuple of 3 items"),
    "bare tensor entry": (lambda w: [good(w), w[NORM]], "entry 1: got torch.Tensor, expected a .name, tensor. pair"),
    "meta tensor": (lambda w: [good(w), (NORM, torch.empty(64, device="meta"))], "entry 1 .*a meta tensor"),
    "sparse tensor": (lambda w: [good(w), (NORM, w[NORM].to_sparse())], "entry 1 .*sparse_coo tensor"),
    "None": (lambda w: None, "takes .name, tensor. pairs or a dict name -> tensor, got None"),
    "a tensor": (lambda w: w[NORM], "got torch.Tensor"),
    "a string": (lambda w: NORM, "got str"),
    "nothing": (lambda w: [], "got no tensors"),
    "a name twice": (lambda w: [good(w), good(w)], f"same tensor name more than once: {UP}"),
    "int tensor": (lambda w: [good(w), (NORM, w[NORM].to(torch.int64))], "floating point"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_weights_are_refused_before_anything_is_copied(checkpoint_dir, trainer_weights, fresh, case):
    build, message = BAD[case]
    engine = engine_for(checkpoint_dir("qwen3"))
    with pytest.raises(CheckpointError, match=message):
        engine.load_weights(build(trainer_weights))
    assert engine.weight_version == 0 and not engine.worker.missing_weights
    assert greedy(engine) == fresh


@pytest.mark.parametrize("version", ["5", True, 2.0, [3]])
def test_version_that_is_not_an_int_is_refused(checkpoint_dir, trainer_weights, fresh, version):
    engine = engine_for(checkpoint_dir("qwen3"))
    with pytest.raises(ValueError) as err:
        engine.load_weights(trainer_weights, version=version)
    assert str(err.value) == f"version must be an int (or None for weight_version + 1), got {version!r}"
    with pytest.raises(ValueError, match="version -1 is not newer than the serving weight_version 0"):
        engine.load_weights(trainer_weights, version=-1)
    assert engine.weight_version == 0
    assert greedy(engine) == fresh


def test_dict_loads_like_its_items_and_numpy_int_versions_are_ints(checkpoint_dir, trainer_weights, tmp_path):
    by_dict, by_items = engine_for(checkpoint_dir("qwen3")), engine_for(checkpoint_dir("qwen3"))
    assert by_dict.load_weights(trainer_weights, version=np.int64(3)) == 3
    assert type(by_dict.weight_version) is int
    by_items.load_weights(trainer_weights.items())
    model = AutoModelForCausalLM.from_config(make_config("qwen3"), dtype=torch.float32)
    model.load_state_dict(trainer_weights)
    model.save_pretrained(tmp_path / "trainer")
    assert greedy(by_dict) == greedy(by_items) == greedy(engine_for(tmp_path / "trainer"))


def nan_weights(trainer_weights):
    poisoned = {name: trainer_weights[name].clone() for name in (UP, NORM)}
    poisoned[UP][1, 2] = float("nan")
    return poisoned


def test_nan_weights_warn_naming_the_tensor(checkpoint_dir, trainer_weights):
    engine = engine_for(checkpoint_dir("qwen3"))
    with pytest.warns(RuntimeWarning, match=r"load_weights: 1 tensor\(s\) hold NaN or Inf: "
                                            r"model.layers.0.mlp.gate_up_proj.weight \(from .*up_proj.weight\)"):
        assert engine.load_weights(nan_weights(trainer_weights)) == 1


def test_nan_weights_are_refused_when_asked(checkpoint_dir, trainer_weights, fresh):
    engine = engine_for(checkpoint_dir("qwen3"), check_finite_weights=True)
    with pytest.raises(CheckpointError, match=f"load_weights: 1 tensor.s. hold NaN or Inf: {UP}$"):
        engine.load_weights(nan_weights(trainer_weights))
    assert engine.weight_version == 0 and not engine.worker.missing_weights
    assert greedy(engine) == fresh
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine.load_weights({NORM: trainer_weights[NORM]}) == 1
