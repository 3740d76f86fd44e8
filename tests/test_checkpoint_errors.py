"""Checkpoints that are broken, unsafe or hold non-finite weights fail at construction with a CheckpointError naming
the file and the problem (or warn, for NaN / Inf, unless check_finite_weights refuses them)."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import copy_checkpoint, edit_json, edit_tensors, shard_checkpoint
from rollout import CheckpointError, RolloutEngine, SamplingParams
from rollout.demo import build_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[4, 8, 15, 16, 23, 42], [99, 7, 301]]


def engine_for(path, **config):
    return RolloutEngine(model=str(path), device="cpu", num_kv_blocks=64, **config)


def greedy(engine):
    return [o.samples[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture
def ckpt(checkpoint_dir, tmp_path):
    """A private copy of the random qwen3 checkpoint (seed 0) to break."""
    return copy_checkpoint(checkpoint_dir("qwen3"), tmp_path / "ckpt")


@pytest.mark.parametrize("name, dtype", [
    ("model.embed_tokens.weight", torch.int64),
    ("model.norm.weight", torch.bool),
    ("model.layers.1.self_attn.o_proj.weight", torch.int32),
])
def test_integer_and_bool_tensors_are_refused(ckpt, name, dtype):
    edit_tensors(ckpt, lambda t: t.update({name: (t[name] * 10).to(dtype)}))
    with pytest.raises(CheckpointError, match=f"floating point: {name}: dtype {dtype}"):
        engine_for(ckpt)


def test_nan_in_checkpoint_warns_naming_the_tensor_and_refuses_when_asked(ckpt):
    def poison(t):
        t["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
        t["model.norm.weight"][7] = float("-inf")

    edit_tensors(ckpt, poison)
    with pytest.warns(RuntimeWarning, match="2 tensor.*NaN or Inf") as record:
        engine_for(ckpt)
    message = str(record[0].message)
    assert "model.layers.0.mlp.gate_up_proj.weight (from model.layers.0.mlp.gate_proj.weight, " \
           "model.layers.0.mlp.up_proj.weight)" in message and "model.norm.weight" in message
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt}: 2 tensor.*NaN or Inf"):
        engine_for(ckpt, check_finite_weights=True)


def test_value_too_large_for_float16_counts_as_inf(ckpt):
    edit_tensors(ckpt, lambda t: t["model.layers.1.self_attn.o_proj.weight"].__setitem__((0, 0), 1e5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine_for(ckpt)  # float32: finite
    with pytest.raises(CheckpointError, match="NaN or Inf: model.layers.1.self_attn.o_proj.weight$"):
        engine_for(ckpt, dtype="float16", check_finite_weights=True)


def test_finite_checkpoint_loads_without_warning(checkpoint_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine_for(checkpoint_dir("llama3"), check_finite_weights=True)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def add_tokenizer(ckpt):
    build_tokenizer().save_pretrained(ckpt)


# (what to break, file the error must name, what it must say)
BROKEN = {
    "truncated safetensors": (lambda c: truncate(c / "model.safetensors"), "model.safetensors", "truncated or corrupt"),
    "garbage safetensors": (lambda c: (c / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{no"),
                            "model.safetensors", "not a readable safetensors file"),
    "config not JSON": (lambda c: (c / "config.json").write_text("{model_type: qwen3"), "config.json",
                        "not a readable JSON file"),
    "config a list": (lambda c: (c / "config.json").write_text("[1, 2]"), "config.json", "JSON object with a"),
    "config without model_type": (lambda c: edit_json(c / "config.json", lambda d: d.pop("model_type")),
                                  "config.json", '"model_type"'),
    "unknown model_type": (lambda c: edit_json(c / "config.json", lambda d: d.update(model_type="frobnicator")),
                           "config.json", "model_type 'frobnicator' is unknown"),
    "config value transformers refuses": (lambda c: edit_json(c / "config.json", lambda d: d.update(hidden_size="x")),
                                          "config.json", "transformers cannot use it.*hidden_size"),
    "generation config not JSON": (lambda c: (c / "generation_config.json").write_text("{"), "generation_config.json",
                                   "not a readable JSON file"),
    "tokenizer.json not JSON": (lambda c: (add_tokenizer(c), (c / "tokenizer.json").write_text('{"version": ')),
                                "tokenizer.json", "not a readable JSON file"),
    "tokenizer.json an empty object": (lambda c: (add_tokenizer(c), (c / "tokenizer.json").write_text("{}")),
                                       "tokenizer.json", "tokenizer of .* cannot be loaded"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_file_is_a_checkpoint_error_naming_it(ckpt, case):
    breaker, file, problem = BROKEN[case]
    breaker(ckpt)
    with pytest.raises(CheckpointError, match=problem) as err:
        engine_for(ckpt)
    assert str(ckpt / file) in str(err.value) or (file in str(err.value) and str(ckpt) in str(err.value))


def test_tokenizer_that_loads_is_used(ckpt):
    add_tokenizer(ckpt)
    assert engine_for(ckpt).tokenizer.encode("hello world") == build_tokenizer().encode("hello world")


@pytest.mark.parametrize("index", [{"metadata": {}}, {"weight_map": ["a.safetensors"]}, {"weight_map": {}},
                                   {"weight_map": {"model.norm.weight": 3}}, [1]])
def test_index_without_a_usable_weight_map_is_refused(ckpt, index):
    shard_checkpoint(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match='model.safetensors.index.json needs a "weight_map" object'):
        engine_for(ckpt)


def test_index_not_json_is_refused(ckpt):
    shard_checkpoint(ckpt)
    (ckpt / "model.safetensors.index.json").write_text("{'weight_map': ")
    with pytest.raises(CheckpointError, match=f"{ckpt / 'model.safetensors.index.json'} is not a readable JSON"):
        engine_for(ckpt)


def test_shards_in_a_subdirectory_load_like_the_single_file(checkpoint_dir, ckpt):
    shard_checkpoint(ckpt, ("shards/a.safetensors", "shards/b.safetensors"))
    assert greedy(engine_for(ckpt)) == greedy(engine_for(checkpoint_dir("qwen3")))


@pytest.mark.parametrize("outside", ["../x/model.safetensors", "shards/../../x/model.safetensors", "ABSOLUTE"])
def test_index_entry_outside_the_checkpoint_is_refused(ckpt, tmp_path, outside):
    index = shard_checkpoint(ckpt)
    (tmp_path / "x").mkdir()
    (ckpt / "b.safetensors").rename(tmp_path / "x" / "model.safetensors")  # a real, loadable file out there
    target = str(tmp_path / "x" / "model.safetensors") if outside == "ABSOLUTE" else outside
    index["weight_map"] = {n: target if s == "b.safetensors" else s for n, s in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names shard files outside the checkpoint directory"):
        engine_for(ckpt)


def test_tensor_stored_in_two_shards_is_refused(ckpt):
    index = shard_checkpoint(ckpt)
    name = next(n for n, s in index["weight_map"].items() if s == "a.safetensors")
    b = load_file(ckpt / "b.safetensors")
    b[name] = load_file(ckpt / "a.safetensors")[name]
    save_file(b, ckpt / "b.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {name} is stored twice"):
        engine_for(ckpt)


@pytest.mark.parametrize("field, value", [("vocab_size", -1), ("vocab_size", 0), ("num_attention_heads", 0),
                                          ("max_position_embeddings", -5)])
def test_non_positive_sizes_are_refused(ckpt, field, value):
    edit_json(ckpt / "config.json", lambda d: d.update({field: value}))
    with pytest.raises(CheckpointError, match=f"config.json: {field}={value}; these sizes must be positive"):
        engine_for(ckpt)


@pytest.mark.parametrize("file, eos", [
    ("config.json", 384),  # == vocab_size
    ("config.json", -3),
    ("config.json", [2, 999]),
    ("generation_config.json", 5000),
    ("generation_config.json", [2, True]),
])
def test_eos_token_id_outside_the_vocabulary_is_refused(ckpt, file, eos):
    edit_json(ckpt / file, lambda d: d.update(eos_token_id=eos))
    with pytest.raises(CheckpointError, match=f"{file}: eos_token_id .* must be a token id in \\[0, 384\\)"):
        engine_for(ckpt)


def test_eos_token_ids_in_range_are_used(ckpt):
    edit_json(ckpt / "generation_config.json", lambda d: d.update(eos_token_id=[383, 0]))
    assert engine_for(ckpt).core.stops.eos_token_ids == {383, 0}
