"""Prometheus metrics, named like vLLM's with the `leanserve:` prefix, each labelled with the model name.

Gauges and counters that the engine already keeps (queue lengths, KV usage,
token and prefix-cache counters) are read at scrape time by a collector, so
nothing is counted twice; latency histograms are observed as requests progress.

The gauges the endpoint picker of the Gateway API Inference Extension routes by
(its model-server protocol: queue, running, KV-cache use, cache config) are also
published under the vLLM names it reads by default (VLLM_NAMED): the same
samples under a second name, so the two can never disagree.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

disable_created_metrics()   # the *_created series only add noise (vLLM drops them too)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)

# Every metric the server exports (the `_total` suffix of counters is added by the client library).
METRIC_NAMES = (
    "leanserve:num_requests_running", "leanserve:num_requests_waiting", "leanserve:kv_cache_usage_perc",
    "leanserve:prompt_tokens_total", "leanserve:generation_tokens_total", "leanserve:request_success_total",
    "leanserve:num_preemptions_total", "leanserve:prefix_cache_queries_total", "leanserve:prefix_cache_hits_total",
    "leanserve:time_to_first_token_seconds", "leanserve:inter_token_latency_seconds",
    "leanserve:e2e_request_latency_seconds", "leanserve:request_queue_time_seconds",
    "leanserve:request_prompt_tokens", "leanserve:request_generation_tokens", "leanserve:iteration_tokens_total",
    "leanserve:http_requests_total", "leanserve:kernels_info", "leanserve:cache_config_info",
)

# Published a second time under vLLM's name (`vllm:` for `leanserve:`), the name the endpoint picker of the
# Gateway API Inference Extension reads by default (its model-server protocol,
# docs/proposals/003-model-server-protocol). KV usage is a fraction, 0 to 1, in both; the cache info carries
# the labels block_size and num_gpu_blocks. The picker's fifth default, vllm:lora_requests_info, is left out:
# LeanServe serves no LoRA adapters, and the picker skips that metric when it is absent.
VLLM_NAMED = ("leanserve:num_requests_waiting", "leanserve:num_requests_running", "leanserve:kv_cache_usage_perc",
              "leanserve:cache_config_info")
METRIC_NAMES += tuple(name.replace("leanserve:", "vllm:") for name in VLLM_NAMED)


class _EngineCollector:
    """Reads the engine's own gauges and counters at scrape time."""

    def __init__(self, llm, model_name: str) -> None:
        self.llm, self.model_name = llm, model_name

    def collect(self):
        engine = self.llm.engine
        scheduler = engine.scheduler if engine else None
        blocks = engine.block_manager if engine else None
        values = [
            (GaugeMetricFamily, "leanserve:num_requests_running", "Requests in the running batch.",
             len(scheduler.running) if scheduler else 0),
            (GaugeMetricFamily, "leanserve:num_requests_waiting", "Requests waiting to run.", self.llm.num_waiting),
            (GaugeMetricFamily, "leanserve:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).",
             blocks.usage if blocks else 0.0),
            (CounterMetricFamily, "leanserve:num_preemptions", "Requests preempted to free KV cache.",
             scheduler.num_preemptions if scheduler else 0),
            (CounterMetricFamily, "leanserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             blocks.prefix_cache_queries if blocks else 0),
            (CounterMetricFamily, "leanserve:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             blocks.prefix_cache_hits if blocks else 0),
        ]
        if engine:
            values += [
                (InfoMetricFamily, "leanserve:kernels", "What runs each operation: the executor (native, with its "
                 "ISA level, or torch), the linears and attention.", engine.kernels),
                (InfoMetricFamily, "leanserve:cache_config", "The KV cache: tokens per block and blocks in all.",
                 {"block_size": str(blocks.block_size), "num_gpu_blocks": str(blocks.num_blocks)}),
            ]
        for family, name, doc, value in values:
            metric = family(name, doc, labels=["model_name"])
            metric.add_metric([self.model_name], value)
            yield metric
            if metric.samples[0].name in VLLM_NAMED:
                yield _vllm_named(metric)


def _vllm_named(metric: Metric) -> Metric:
    """The same family and samples, named `vllm:` instead of `leanserve:`."""
    renamed = Metric(metric.name.replace("leanserve:", "vllm:"), metric.documentation, metric.type)
    renamed.samples = [s._replace(name=s.name.replace("leanserve:", "vllm:")) for s in metric.samples]
    return renamed


class ServerMetrics:
    def __init__(self, llm, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        registry, label = self.registry, ["model_name"]
        # Labelled once: .labels() takes a lock and a dict lookup, and generation_tokens counts every token.
        self.prompt_tokens = Counter("leanserve:prompt_tokens", "Prompt tokens processed.", label,
                                     registry=registry).labels(model_name)
        self.generation_tokens = Counter("leanserve:generation_tokens", "Tokens generated.", label,
                                         registry=registry).labels(model_name)
        self.request_success = Counter("leanserve:request_success", "Finished sequences by finish reason.",
                                       label + ["finished_reason"], registry=registry)
        self.http_requests = Counter("leanserve:http_requests", "HTTP requests by method, path and status.",
                                     label + ["method", "path", "status"], registry=registry)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, label, buckets=buckets, registry=registry).labels(model_name)

        self.ttft = histogram("leanserve:time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.itl = histogram("leanserve:inter_token_latency_seconds", "Time between tokens.", LATENCY_BUCKETS)
        self.e2e = histogram("leanserve:e2e_request_latency_seconds", "End-to-end request latency.",
                             LATENCY_BUCKETS)
        self.queue_time = histogram("leanserve:request_queue_time_seconds", "Time waiting before first compute.",
                                    LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("leanserve:request_prompt_tokens", "Prompt tokens per request.",
                                               TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("leanserve:request_generation_tokens",
                                                   "Generated tokens per request.", TOKEN_BUCKETS)
        self.iteration_tokens = histogram("leanserve:iteration_tokens_total", "Tokens computed per engine step.",
                                          TOKEN_BUCKETS)
        registry.register(_EngineCollector(llm, model_name))
        llm.on_step = self.iteration_tokens.observe

    def track(self, prompt_tokens: int) -> RequestTracker:
        return RequestTracker(self, prompt_tokens)


class RequestTracker:
    """Observes one request's latencies and token counts as its outputs arrive."""

    def __init__(self, metrics: ServerMetrics, prompt_tokens: int) -> None:
        self.metrics = metrics
        self.prompt_tokens = prompt_tokens
        self.start = time.monotonic()
        self.last_token: float | None = None
        self.generated = 0

    def progress(self, output) -> None:
        m, now = self.metrics, time.monotonic()
        new = sum(len(o.token_ids_delta) for o in output.outputs)
        if new:
            if self.last_token is None:
                m.ttft.observe(now - self.start)
                m.prompt_tokens.inc(self.prompt_tokens)
                if output.first_scheduled_time is not None:
                    m.queue_time.observe(max(0.0, output.first_scheduled_time - output.arrival_time))
            else:
                m.itl.observe(now - self.last_token)
            self.last_token = now
            self.generated += new
            m.generation_tokens.inc(new)
        if output.finished:
            m.e2e.observe(now - self.start)
            m.request_prompt_tokens.observe(self.prompt_tokens)
            m.request_generation_tokens.observe(self.generated)
            for o in output.outputs:
                m.request_success.labels(m.model_name, o.finish_reason).inc()
