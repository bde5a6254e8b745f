"""`GET /metrics`: the server's counters in Prometheus' text format, under vLLM's metric names.

Names, kinds and histogram buckets follow vLLM's (`vllm:` prefix, a `model_name` label), so a
Grafana dashboard made for vLLM reads a crossvlm server as it is. Latencies are measured from the
moment the server had the whole request body (as vLLM's front end does): time to first token,
inter-token latency (every gap between two tokens reaching the host), time per output token (a
request's mean gap) and end to end. Gauges (running, waiting, KV use) are read at each scrape.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps in one process keep theirs apart)."""

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests generating (holding KV blocks).", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for KV blocks or a batch row.", labels, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Share of the KV cache in use (1 = all of it).", labels,
                              registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens of finished requests.", labels,
                                         registry=r)
        self.success = Counter("vllm:request_success", "Requests finished, by finish reason (stop, length, abort).",
                               [*labels, "finished_reason"], registry=r)
        self.refused = Counter("crossvlm:requests_refused", "Requests answered with an error status, by status.",
                               [*labels, "status"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to the first token, seconds.", labels,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between two tokens of a request, seconds.",
                             labels, buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "A request's mean time per token after the first.",
                              labels, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Time from request to its last token, seconds.",
                             labels, buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time a request waited for a KV slot, seconds.",
                               labels, buckets=E2E_BUCKETS, registry=r)
        self.request_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", labels,
                                        buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation = Histogram("vllm:request_generation_tokens", "Generated tokens per request.", labels,
                                            buckets=TOKEN_BUCKETS, registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      labels, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens the prefix cache held (not recomputed).",
                                   labels, registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Times a request gave its KV blocks back and was recomputed.",
                                   labels, registry=r)
        self.model_name = model_name

    def finished(self, request, arrived: float, reason: str) -> None:
        """Count a request that ended (`reason`: stop, length or abort); `arrived` is its perf_counter time."""
        name = self.model_name
        times = request.token_times
        self.success.labels(name, reason).inc()
        self.prompt_tokens.labels(name).inc(request.prompt_tokens)
        self.generation_tokens.labels(name).inc(request.generated)
        self.request_prompt.labels(name).observe(request.prompt_tokens)
        self.request_generation.labels(name).observe(request.generated)
        self.prefix_queries.labels(name).inc(request.prompt_tokens)
        self.prefix_hits.labels(name).inc(request.cached_tokens)
        self.preemptions.labels(name).inc(request.preemptions)
        self.e2e.labels(name).observe((times[-1] if times else time.perf_counter()) - arrived)
        if request.admitted:
            self.queue.labels(name).observe(request.admitted - request.submitted)
        if times:
            self.ttft.labels(name).observe(times[0] - arrived)
            itl = self.itl.labels(name)
            for before, after in zip(times, times[1:]):
                itl.observe(after - before)
            if len(times) > 1:
                self.tpot.labels(name).observe((times[-1] - times[0]) / (len(times) - 1))

    def render(self, engine) -> bytes:
        """The text format, with the gauges read now from `engine`."""
        name = self.model_name
        self.running.labels(name).set(engine.running())
        self.waiting.labels(name).set(engine.waiting())
        blocks = engine.blocks
        self.kv_usage.labels(name).set(1 - blocks.available / max(1, blocks.blocks - 1))  # blocks held by requests (cached, unheld ones count as free)
        return generate_latest(self.registry)
