"""The demo checkpoint, `run_demo` and the `rollout` command line (CPU)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout.cli import _write, main
from rollout.demo import DEMO_PROMPTS, build_demo_checkpoint, default_demo_dir, ensure_demo_checkpoint, run_demo
from rollout.outputs import RolloutOutput, Sample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The model is tiny: one thread is as fast, and far faster when other jobs share the CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return ensure_demo_checkpoint(tmp_path_factory.mktemp("cache") / "demo")


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return AutoTokenizer.from_pretrained(ckpt)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_demo_builds_the_cache_once_then_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ROLLOUT_CACHE", str(tmp_path))
    printed = []
    first = run_demo(num_prompts=3, n=2, max_tokens=6, print_fn=printed.append)
    weights = default_demo_dir() / "model.safetensors"
    assert default_demo_dir() == tmp_path / "demo-qwen3-v1" and weights.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["demo-qwen3-v1"]  # no temporary build dir left behind
    mtime = weights.stat().st_mtime_ns

    tokenizer = AutoTokenizer.from_pretrained(default_demo_dir())
    assert first["prompt_tokens"] == sum(len(tokenizer.encode(p)) for p in DEMO_PROMPTS[:3])
    assert (first["num_requests"], first["num_samples"]) == (3, 6)
    assert 6 <= first["output_tokens"] <= 6 * 6
    assert sum(first["finish_reasons"].values()) == 6
    assert first["tokens_per_s"] == pytest.approx(first["output_tokens"] / first["wall_s"])
    assert first["architecture"] == "Qwen3ForCausalLM" and first["device"] == "cpu"
    report = "\n".join(printed)
    assert "3 prompts x n=2 = 6 samples" in report and "generated tokens/s" in report

    second = run_demo(num_prompts=3, n=2, max_tokens=6, print_fn=lambda line: None)
    assert weights.stat().st_mtime_ns == mtime
    assert second["output_tokens"] == first["output_tokens"]  # seeded per prompt: the same samples again


def test_demo_checkpoint_is_a_consistent_qwen3_with_its_tokenizer(ckpt, tokenizer):
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["vocab_size"] == len(tokenizer) > 900
    assert config["eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.pad_token == "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert all(p.std() > 0 for p in model.parameters())  # random everywhere, norms included


@pytest.mark.parametrize("text", ["The quick brown fox jumps over the lazy dog.", "naïve café, 日本語 🚀\n\t"])
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= t < len(tokenizer) for t in ids)


def test_tokenizer_learned_merges_from_its_corpus(tokenizer):
    assert len(tokenizer.encode("the rollout engine samples the policy")) < 12  # far fewer than its 37 bytes


def test_build_keeps_a_checkpoint_another_process_finished_first(ckpt):
    mtime = (ckpt / "model.safetensors").stat().st_mtime_ns
    assert build_demo_checkpoint(ckpt) == ckpt
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in ckpt.parent.iterdir()] == [ckpt.name]


def test_generate_writes_one_line_per_prompt_in_order(ckpt, tokenizer, tmp_path):
    text = "Every morning she walks to"
    prompts = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": text},
        "",
        {"prompt_token_ids": [5, 17, 300], "sampling_params": {"max_tokens": 3, "n": 2}},
    ])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(ckpt), "--prompts", str(prompts), "--output", str(out),
            "--device", "cpu", "--max-tokens", "5", "--seed", "7", "--logprobs"]
    assert main(argv) == 0
    first, second = read_jsonl(out)
    assert first["prompt_token_ids"] == tokenizer.encode(text)
    assert second["prompt_token_ids"] == [5, 17, 300]
    assert [len(first["samples"]), len(second["samples"])] == [1, 2]
    for output, max_tokens in [(first, 5), (second, 3)]:
        for sample in output["samples"]:
            assert 1 <= len(sample["token_ids"]) <= max_tokens
            assert len(sample["logprobs"]) == len(sample["token_ids"])
            assert all(lp <= 0.0 for lp in sample["logprobs"])
            assert (sample["finish_reason"] == "length") == (len(sample["token_ids"]) == max_tokens)


def test_greedy_generate_to_stdout_matches_transformers(ckpt, tokenizer, tmp_path, capsys):
    text = "The weather report promised"
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": text, "sampling_params": {"ignore_eos": True}}])
    argv = ["generate", "--model", str(ckpt), "--prompts", str(prompts), "--device", "cpu",
            "--temperature", "0", "--max-tokens", "6"]
    assert main(argv) == 0
    [line] = capsys.readouterr().out.splitlines()
    [sample] = json.loads(line)["samples"]

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = tokenizer.encode(text)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert sample["token_ids"] == ids[-6:]
    assert sample["text"] == tokenizer.decode(ids[-6:], skip_special_tokens=True)


def test_seed_makes_runs_reproducible_while_repeated_prompts_differ(ckpt, tmp_path):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "The quick brown fox"}] * 2)
    runs = []
    for name in ("a.jsonl", "b.jsonl"):
        argv = ["generate", "--model", str(ckpt), "--prompts", str(prompts), "--output", str(tmp_path / name),
                "--device", "cpu", "--seed", "3", "--max-tokens", "8", "--temperature", "1.0"]
        assert main(argv) == 0
        runs.append([line["samples"][0]["token_ids"] for line in read_jsonl(tmp_path / name)])
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]


def run_cli(argv: list, capsys) -> str:
    """Run `rollout` on argv; it must exit 2 with one line on stderr and no traceback. Returns that line."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "unterminated"', "not valid JSON"),
    ({"prompt": "x", "prompt_token_ids": [1]}, "exactly one of"),
    ({"prompt": "x", "sampling_params": {"top_p": 2.0}}, "top_p"),
    ({"prompt": "x", "sampling_params": {"temprature": 0.5}}, "temprature"),
    ({"prompt_token_ids": [1, 10**6]}, "token ids must be in [0, 1024); got [1000000]"),
    ({"prompt_token_ids": "abc"}, '"prompt_token_ids" must be a list of ints, got str'),
    ({"prompt_token_ids": [5, 2.0]}, "token ids must be ints; got float 2.0 at position 1"),
    ({"prompt_token_ids": [5, True]}, "token ids must be ints; got bool True"),
    ({"prompt_token_ids": []}, "no tokens"),
    ({"prompt": "x", "sampling_params": {"n": True}}, "n: expected an integer, got bool True"),
    ({"prompt": "x", "sampling_params": {"stop_token_ids": "abc"}}, "stop_token_ids: Input should be a valid list"),
    ({"prompt": "x", "sampling_params": {"stop_token_ids": [5000]}}, "stop_token_ids must be in [0, 1024)"),
    ({"prompt": "x", "sampling_params": {"temperature": 1e-39}}, "temperature: must be 0 (greedy) or from 1e-30"),
    ('{"prompt": "x", "sampling_params": {"temperature": 1e999}}', "temperature: Input should be a finite number"),
    ('{"prompt": "x", "sampling_params": {"temperature": NaN}}', "temperature: Input should be a finite number"),
    ({"prompt": "x", "sampling_params": {"top_k": 10**30}}, "top_k: Input should be less than or equal to 2147483647"),
    ({"prompt": "x", "sampling_params": {"seed": 2**63}}, "seed: Input should be less than or equal to"),
    ({"prompt": "x", "sampling_params": {"seed": -1}}, "seed: Input should be greater than or equal to 0"),
])
def test_bad_line_exits_2_naming_the_line_and_writes_nothing(ckpt, tmp_path, capsys, bad_line, message):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "fine"}, bad_line, {"prompt": "also fine"}])
    out = tmp_path / "out.jsonl"
    err = run_cli(["generate", "--model", ckpt, "--prompts", prompts, "--output", out, "--device", "cpu"], capsys)
    assert f"{prompts} line 2: " in err and message in err
    assert "prompt 0" not in err and "prompt 1" not in err
    assert not out.exists()


def test_errors_name_the_line_of_the_file_past_blank_lines(ckpt, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, "", {"prompt_token_ids": [1, 2]}, "",
                                                  {"prompt_token_ids": [3, 4096]}])
    err = run_cli(["generate", "--model", ckpt, "--prompts", prompts, "--device", "cpu"], capsys)
    assert f"{prompts} line 5: token ids must be in [0, 1024); got [4096]" in err


def test_non_utf8_prompts_file_exits_2_naming_the_line(ckpt, tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    prompts.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')  # Latin-1, not UTF-8
    err = run_cli(["generate", "--model", ckpt, "--prompts", prompts, "--device", "cpu"], capsys)
    assert f"{prompts} line 2: not UTF-8 text (byte 0xe9 at position 16)" in err


def test_unusable_prompts_or_output_path_exits_2_before_loading_the_model(tmp_path, capsys):
    """--output is checked before anything else: the (missing) checkpoint is never reached."""
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    nope = tmp_path / "nope"
    err = run_cli(["generate", "--model", nope, "--prompts", tmp_path], capsys)
    assert f"cannot read --prompts {tmp_path}: Is a directory" in err
    err = run_cli(["generate", "--model", nope, "--prompts", prompts, "--output", tmp_path], capsys)
    assert f"--output {tmp_path} is a directory" in err
    err = run_cli(["generate", "--model", nope, "--prompts", prompts, "--output", nope / "out.jsonl"], capsys)
    assert f"the directory {nope} does not exist" in err
    err = run_cli(["generate", "--model", nope, "--prompts", prompts, "--output", tmp_path / "." / "in.jsonl"], capsys)
    assert "is the --prompts file; writing would overwrite it" in err
    err = run_cli(["generate", "--model", nope, "--prompts", nope / "in.jsonl"], capsys)
    assert f"cannot read --prompts {nope / 'in.jsonl'}: No such file or directory" in err


def test_bad_sampling_flag_is_named_once(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    err = run_cli(["generate", "--model", tmp_path, "--prompts", prompts, "--top-k", str(10**30)], capsys)
    assert "top_k: Input should be less than or equal to 2147483647" in err and "line" not in err
    err = run_cli(["generate", "--model", tmp_path, "--prompts", prompts, "--temperature", "inf"], capsys)
    assert "temperature: Input should be a finite number" in err


def test_bad_engine_seed_exits_2(ckpt, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    err = run_cli(["generate", "--model", ckpt, "--prompts", prompts, "--device", "cpu", "--seed", str(2**63)], capsys)
    assert "seed: Input should be less than or equal to 9223372036854775807" in err


def test_output_is_strict_json(ckpt, tmp_path):
    """JSON has no NaN or Infinity: a -inf logprob (a token top_k ruled out, asked for in top_logprobs) is
    written as null; a NaN fails loudly instead of producing a file other tools cannot read."""
    params = {"top_k": 2, "top_logprobs": 4, "logprobs": True, "max_tokens": 3, "seed": 1}
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "The quick brown fox", "sampling_params": params}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(ckpt), "--prompts", str(prompts), "--output", str(out),
                 "--device", "cpu"]) == 0
    [line] = out.read_text().splitlines()
    [sample] = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the output"))["samples"]
    for position in sample["top_logprobs"]:
        assert len(position) == 4 and sum(lp is None for lp in position.values()) == 2  # 2 tokens left by top_k
        assert all(lp <= 0 for lp in position.values() if lp is not None)

    nan = Sample(token_ids=[3], logprobs=[float("nan")], finish_reason="length", weight_version=0,
                 token_weight_versions=[0])
    with pytest.raises(ValueError, match="not JSON compliant"):
        _write([RolloutOutput(request_id="0", prompt_token_ids=[1], samples=[nan])], io.StringIO())


def test_demo_on_a_checkpoint_without_tokenizer_says_what_the_demo_needs(ckpt, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((ckpt / name).read_bytes())
    err = run_cli(["demo", "--model", bare], capsys)
    assert f"{bare} has no tokenizer" in err and "demo samples from text prompts" in err
    assert "token ids" not in err


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompts", str(prompts)]) == 2
    assert "nope is not a checkpoint directory" in capsys.readouterr().err


def test_demo_command_runs_as_a_module(ckpt):
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}  # one thread: robust to a busy 2-core box
    result = subprocess.run(
        [sys.executable, "-m", "rollout.cli", "demo", "--model", str(ckpt), "--prompts", "2", "--n", "3",
         "--max-tokens", "4"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "2 prompts x n=3 = 6 samples" in result.stdout
    assert "first tokens (id: logprob)" in result.stdout
