"""`leanserve serve`: options (each also from a LEANSERVE_<NAME> environment variable), logging, graceful drain."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

import uvicorn

from leanserve.engine.async_llm import AsyncLLM
from leanserve.engine.engine_config import DTYPES, KV_CACHE_DTYPES, QUANTIZATION_CHOICES, EngineConfig
from leanserve.server.app import ServerConfig, create_app
from leanserve.server.tool_calls import PARSERS

log = logging.getLogger("leanserve.server")


def _flag(value: str) -> bool:
    """true/false, yes/no, on/off or 1/0 (bool("false") would be True)."""
    word = value.strip().lower()
    if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return word in ("1", "true", "yes", "on")


def _env(name: str, default=None, kind=str):
    value = os.environ.get(f"LEANSERVE_{name.upper().replace('-', '_')}")
    if value is None:
        return default
    return _flag(value) if kind is bool else kind(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def option(name: str, kind=str, default=None, **kwargs):
        parser.add_argument(f"--{name}", type=_flag if kind is bool else kind, default=_env(name, default, kind),
                            help=f"{kwargs.pop('help', '')} [env LEANSERVE_{name.upper().replace('-', '_')}]",
                            **kwargs)

    parser.add_argument("model", nargs="?", default=_env("model", "smollm2"),
                        help="'smollm2', a .gguf file or a HuggingFace directory [env LEANSERVE_MODEL]")
    option("host", default="127.0.0.1", help="address to listen on")
    option("port", int, 8000, help="port to listen on")
    option("api-key", help="require 'Authorization: Bearer KEY' on the API (not on /health or /metrics)")
    parser.add_argument("--served-model-name", nargs="+", default=(_env("served-model-name") or "").split() or None,
                        help="the model names clients may send; /v1/models lists them all (default: MODEL) "
                             "[env LEANSERVE_SERVED_MODEL_NAME, names separated by spaces]")
    option("tool-call-parser", choices=sorted(PARSERS),
           help="the model's tool-call syntax (default: the one its chat template teaches, else hermes)")
    option("dtype", default="float32", choices=sorted(DTYPES), help="weights and activations")
    option("quantization", choices=list(QUANTIZATION_CHOICES),
           help="weight format: int8, int4, llm_int8 or float (default: the checkpoint's, int4 for a Q4 GGUF file)")
    option("max-num-seqs", int, 256, help="most sequences in one step")
    option("max-num-batched-tokens", int, 2048, help="most tokens in one step")
    option("max-model-len", int, help="context length (default: the model's)")
    option("kv-cache-tokens", int, help="KV-cache size in tokens (default: a share of available memory)")
    option("block-size", int, 16, help="tokens per KV-cache block")
    option("kv-cache-dtype", default="auto", choices=["auto", *sorted(KV_CACHE_DTYPES)],
           help="KV-cache element type (auto: float16 for a float32 model on the CPU, else the model's dtype)")
    option("enable-prefix-caching", bool, True, help="reuse cached prompt prefixes (true/false)")
    option("max-queued-requests", int, help="answer 429 when this many requests wait")
    option("max-body-bytes", int, 4 * 1024 * 1024, help="largest request body")
    option("shutdown-timeout", float, 30.0, help="seconds in-flight requests get to finish after SIGTERM")
    option("seed", int, 0, help="seed for unseeded sampling")
    option("deterministic", bool, False, help="batch-invariant logits: a request's tokens and log-probs the same "
           "bits in any batch, chunking, prefix-cache state or preemption (true/false)")
    option("log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with any `extra=` fields."""

    _standard = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items()
                      if k not in self._standard and not k.startswith("color_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: answer 503 to new requests, let in-flight ones finish, then stop."""

    def __init__(self, config: uvicorn.Config, llm: AsyncLLM, state, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.llm, self.state, self.shutdown_timeout = llm, state, shutdown_timeout
        self._drain_task: asyncio.Task | None = None

    async def on_tick(self, counter: int) -> bool:
        if self.llm.load_error is not None:       # nothing to serve: exit (non-zero) rather than linger
            self.should_exit = True
        return await super().on_tick(counter)

    def handle_exit(self, sig, frame) -> None:
        if self._drain_task is not None:          # a second signal: stop now
            return super().handle_exit(sig, frame)
        self.state.draining = True
        log.info("draining", extra={"in_flight": self.state.in_flight, "timeout_s": self.shutdown_timeout})
        self._drain_task = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while self.state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        log.info("drained", extra={"in_flight_left": self.state.in_flight})
        self.should_exit = True


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    config = EngineConfig(model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                          kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size,
                          enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
                          deterministic=args.deterministic,
                          quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    llm = AsyncLLM(config)
    llm.start()
    names = args.served_model_name or [args.model]
    app = create_app(llm, ServerConfig(served_model_names=names, api_key=args.api_key,
                                       max_queued_requests=args.max_queued_requests,
                                       max_body_bytes=args.max_body_bytes, tool_call_parser=args.tool_call_parser))
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                                           log_level=args.log_level, access_log=False),
                            llm, app.state.server, args.shutdown_timeout)
    log.info("listening", extra={"host": args.host, "port": args.port, "model": names[0],
                                 "auth": bool(args.api_key)})
    server.run()
    llm.stop()
    if llm.load_error is not None:
        log.error("the model failed to load", extra={"error": str(llm.load_error)})
        return 1
    return 0
