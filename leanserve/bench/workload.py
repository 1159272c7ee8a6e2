"""The benchmark workload format: one JSON chat request a line ({"id", "messages", "max_tokens"})."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKLOAD = Path("../shared/bench/chat-256.jsonl")


@dataclass
class ChatRequest:
    id: str
    messages: list[dict]
    max_tokens: int


def load_workload(path: str | Path = DEFAULT_WORKLOAD, limit: int | None = None) -> list[ChatRequest]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workload file {path} not found (pass --workload)")
    requests = []
    with path.open() as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                requests.append(ChatRequest(row["id"], row["messages"], int(row["max_tokens"])))
    return requests[:limit]
