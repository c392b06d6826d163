"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 576, 1024, 2048, 4096)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("atp_jax_requests", "Chat-completion requests by HTTP status", ["status"],
                                registry=self.registry)
        self.ttft = Histogram("atp_jax_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=SECONDS, registry=self.registry)
        self.latency = Histogram("atp_jax_request_latency_seconds", "From a request's arrival to its last token",
                                 buckets=SECONDS, registry=self.registry)
        self.generated = Counter("atp_jax_generated_tokens", "Tokens generated (rate(): tokens per second)",
                                 registry=self.registry)
        self.decode_speed = Histogram("atp_jax_decode_tokens_per_second", "Each answer's decode speed",
                                      buckets=TOKENS, registry=self.registry)
        self.visual = Histogram("atp_jax_kept_visual_tokens", "Each answer's average visual tokens per decoder layer",
                                buckets=TOKENS, registry=self.registry)

    def watch(self, busy, waiting, kv_bytes) -> None:
        """Gauges read when scraped: `busy()` rows decoding, `waiting()` requests queued, `kv_bytes()` the KV
        cache the decode pool holds."""
        for name, doc, read in (("atp_jax_rows_busy", "Requests being decoded (rows of the continuous batch)", busy),
                                ("atp_jax_requests_waiting", "Requests queued for a row", waiting),
                                ("atp_jax_kv_cache_bytes", "KV cache held by the decode pool", kv_bytes)):
            Gauge(name, doc, registry=self.registry).set_function(read)

    def answered(self, result: dict, ttft_s: float, latency_s: float) -> None:
        self.ttft.observe(ttft_s)
        self.latency.observe(latency_s)
        self.generated.inc(len(result["token_ids"]))
        self.decode_speed.observe(result["decode_tokens_per_s"])
        self.visual.observe(result["avg_visual_tokens"])

    def text(self) -> bytes:
        return generate_latest(self.registry)
