"""For the server tests: a tiny checkpoint with a tokenizer and a chat template, and a live server on a free
loopback port (uvicorn in a thread)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from checkpoints import save_checkpoint
from rollout.demo import EOS_TOKEN, build_tokenizer
from rollout.serve.server import make_server

# Qwen-style ChatML with tools rendered in a <tools> block (the shape of Qwen3's template, shortened)
CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}"
    "{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nCall a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') }}"
    "{%- for call in message.tool_calls or [] %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{{- (call.function.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def save_text_checkpoint(path: Path, seed: int = 0, chat_template: bool = True) -> Path:
    """A random tiny Qwen3 with the demo's byte-level BPE tokenizer (and a ChatML template)."""
    tokenizer = build_tokenizer()
    save_checkpoint(path, "qwen3", seed, vocab_size=len(tokenizer),
                    eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN))
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def wait_for(condition, what: str, timeout: float = 60.0, alive=None) -> None:
    """Poll `condition()` until true; AssertionError after `timeout` s or once `alive()` is false."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive is None or alive(), f"gave up waiting for {what}: the process or thread died"
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {timeout} s"
        time.sleep(0.01)


class LiveServer:
    """`make_server(engine, ...)` running in a thread on a free loopback port; `stop()` shuts the engine down."""

    def __init__(self, engine, **options):
        self.server = make_server(engine, "127.0.0.1", 0, log_level="warning", **options)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the server to start", alive=self.thread.is_alive)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not stop"


def serving(checkpoint, config: dict, **options):
    """For a pytest fixture (`yield from serving(...)`): a LiveServer of an AsyncRolloutEngine on `checkpoint`
    built with `config`, stopped afterwards."""
    from rollout import AsyncRolloutEngine

    server = LiveServer(AsyncRolloutEngine(model=str(checkpoint), **config), **options)
    try:
        yield server
    finally:
        server.stop()
