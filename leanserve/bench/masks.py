"""`leanserve bench masks`: what a structured output costs per step, without the model.

For B sequences constrained by one JSON schema (a chat answer's shape), each already part-way into its JSON
(at different points, as in a running batch), times one step's work that structured outputs add:
- the masks: llguidance's bitmask of the allowed next tokens of every constrained row (the engine computes it
  on a worker thread while the model runs, so on a machine with a core to spare it hides behind the step);
- applying them: the sampler's unpacking of the bitmask and masking of the logits [B, vocab];
- consuming the sampled token into each matcher.
Reports milliseconds per step (median of the repeats) at each batch size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from leanserve.engine.loader import load_checkpoint
from leanserve.engine.sampler import _apply_token_masks
from leanserve.engine.structured import GrammarCompiler, MaskFiller
from leanserve.params import SamplingParams, StructuredOutputs
from leanserve.scheduler.request import Request

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "answer", "confidence", "tags"],
          "properties": {"title": {"type": "string"}, "answer": {"type": "string"},
                         "confidence": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}}}}
SAMPLE = json.dumps({"title": "A KV cache", "answer": "It keeps the keys and values of earlier tokens so that each "
                     "decode step attends to them without recomputing them.", "confidence": 0.9,
                     "tags": ["inference", "attention"]})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=50)


def run(args: argparse.Namespace) -> int:
    checkpoint = load_checkpoint(args.model)
    tokenizer, vocab = checkpoint.tokenizer, checkpoint.config.vocab_size
    compiler, filler = GrammarCompiler(tokenizer, vocab), MaskFiller(vocab)
    spec = StructuredOutputs(json=SCHEMA)
    sample = tokenizer.encode(SAMPLE, add_special_tokens=False)
    print(f"{args.model}: vocabulary {vocab}, {torch.get_num_threads()} threads; JSON schema with 4 fields, "
          f"rows part-way through a {len(sample)}-token answer")
    print(f"{'batch':>6} {'masks ms':>9} {'apply ms':>9} {'consume ms':>11} {'total ms':>9}")
    for batch in args.batch_sizes:
        matchers = compiler.matchers(spec, batch)
        for i, m in enumerate(matchers):                  # row i is i * len / batch tokens into its answer
            assert all(m.consume_token(t) for t in sample[:i * (len(sample) - 2) // batch])
        requests = [Request(str(i), [1], SamplingParams(structured_outputs=spec)) for i in range(batch)]
        logits = torch.randn(batch, vocab)
        fill, apply, consume = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            masks = filler.start(matchers).result()
            t1 = time.perf_counter()
            masked = _apply_token_masks(logits, requests, masks, {})
            tokens = masked.argmax(-1).tolist()
            t2 = time.perf_counter()
            for m, t in zip(matchers, tokens):
                m.consume_token(t)
                m.rollback(1)                               # stay at the same point for the next repeat
            fill.append(t1 - t0), apply.append(t2 - t1), consume.append(time.perf_counter() - t2)
        ms = [statistics.median(x) * 1e3 for x in (fill, apply, consume)]
        print(f"{batch:>6} {ms[0]:>9.2f} {ms[1]:>9.2f} {ms[2]:>11.2f} {sum(ms):>9.2f}")
    return 0
