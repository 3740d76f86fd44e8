"""Bad requests against a live server: each gets a 4xx with a JSON error naming what was wrong, and the server
keeps serving (health checked after each)."""

import httpx
import pytest

from serve_helpers import serving

CONFIG = dict(device="cpu", dtype="float32", max_num_seqs=8, max_num_batched_tokens=256, seed=3, max_model_len=128)
KEY = {"Authorization": "Bearer k3y"}
OK_PROMPT = [5, 6, 7]
CHAT = [{"role": "user", "content": "hi"}]

# (method, path, json body or raw bytes, expected status, a piece of the message)
CASES = [
    ("POST", "/v1/completions", b'{"prompt": [1, 2', 400, "JSON"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "dictionary"),
    ("POST", "/v1/completions", b"", 400, "required"),
    ("POST", "/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": [[1, 2], 3]}, 400, "item 1"),
    ("POST", "/v1/completions", {"prompt": [1, True]}, 400, "item 0"),
    ("POST", "/v1/completions", {"prompt": [1, 100000]}, 400, "100000"),
    ("POST", "/v1/completions", {"prompt": [-1, 3]}, 400, "-1"),
    ("POST", "/v1/completions", {"prompt": list(range(3, 203))}, 400, "max_model_len"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "max_tokens": "ten"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/completions", b'{"prompt": [5, 6], "temperature": NaN}', 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "top_k": -5}, 400, "top_k"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "n": 0}, 400, "n"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "seed": -1}, 400, "seed"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "logprobs": 100}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "stop": [""]}, 400, "stop"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "foo": 1}, 400, "foo"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "echo": True, "stream": True}, 400, "echo"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "model": "gpt-9"}, 404, "gpt-9"),
    ("POST", "/v1/completions", {"prompt": OK_PROMPT, "stream": True, "n": -2}, 400, "n"),
    ("POST", "/generate", {"sampling_params": {}}, 400, "input_ids"),
    ("POST", "/generate", {"input_ids": "abc"}, 400, "input_ids"),
    ("POST", "/generate", {"input_ids": OK_PROMPT, "sampling_params": {"max_new_tokens": 5}}, 400, "max_new_tokens"),
    ("POST", "/generate", {"input_ids": OK_PROMPT, "sampling_params": {"n": 2}, "partial": {"token_ids": [3]}},
     400, "n must be 1"),
    ("POST", "/generate", {"input_ids": OK_PROMPT, "partial": {"token_ids": [3, 4], "logprobs": [0.0]}}, 400,
     "logprobs"),
    ("POST", "/generate", {"input_ids": OK_PROMPT, "stream": True, "sampling_params": {"top_p": 2}}, 400, "top_p"),
    ("POST", "/abort_request", {}, 400, "rid"),
    ("POST", "/pause_generation", {"mode": "bogus"}, 400, "mode"),
    ("POST", "/sleep", {"level": 3}, 400, "level"),
    ("POST", "/update_weights", {"path": "/x", "update_info": {}}, 400, "not both"),
    ("POST", "/update_weights", {"update_info": {"version": "x"}}, 400, "version"),
    ("POST", "/init_weight_transfer", {"init_info": {}}, 400, "init_info"),
    ("POST", "/load_weights_from_disk", {"path": "/no/such/dir"}, 400, "safetensors"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "logprobs"),
    ("GET", "/v2/nothing", None, 404, "/v2/nothing"),
    ("GET", "/v1/completions", None, 405, "GET"),
    ("GET", "/generate", None, 405, "GET is not allowed on /generate"),
    ("POST", "/generate", {"input_ids": [5, 6], "stream": True, "sampling_params": {"top_k": -7}}, 400, "top_k"),
    ("POST", "/v1/completions", {"prompt": list(range(3, 20000))}, 413, "limit"),
]


@pytest.fixture(scope="module")
def live(text_checkpoint):
    yield from serving(text_checkpoint, CONFIG, model_name="tiny", api_key="k3y", max_body_bytes=50_000)


@pytest.mark.parametrize("method,path,body,status,piece", CASES, ids=[f"{i}-{c[1]}" for i, c in enumerate(CASES)])
def test_bad_request(live, method, path, body, status, piece):
    raw = isinstance(body, bytes)
    r = httpx.request(method, f"{live.url}{path}", headers={**KEY, "Content-Type": "application/json"},
                      content=body if raw else None, json=None if raw else body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert piece.lower() in error["message"].lower(), error
    assert error["code"] == status
    assert httpx.get(f"{live.url}/health", headers=KEY, timeout=10).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "k3y"}])
def test_missing_or_wrong_key(live, headers):
    r = httpx.post(f"{live.url}/v1/completions", headers=headers, json={"prompt": OK_PROMPT}, timeout=10)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]


def test_still_generates_after_the_battery(live):
    r = httpx.post(f"{live.url}/generate", headers=KEY, json={"input_ids": OK_PROMPT}, timeout=60)
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 16
