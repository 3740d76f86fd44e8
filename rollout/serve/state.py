"""What the routes share: the engine, the served model's name, the requests in flight and the counters."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request


@dataclass
class ServerState:
    """What the routes share: the engine, the served model's name and the engine requests in flight (engine
    request id -> the id of the HTTP request it serves)."""

    engine: object
    model_name: str
    in_flight: dict[str, str] = field(default_factory=dict)
    next_id: int = 0
    requests_total: int = 0
    generated_tokens_total: int = 0
    asleep: set[str] = field(default_factory=set)  # memory tags put to sleep through /sleep
    created: int = field(default_factory=lambda: int(time.time()))

    def new_id(self, prefix: str) -> str:
        self.next_id += 1
        return f"{prefix}-{self.next_id}"


def state(request: Request) -> ServerState:
    return request.app.state.server
