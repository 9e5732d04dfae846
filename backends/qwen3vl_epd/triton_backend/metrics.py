"""Prometheus metrics of our models through Triton's metrics API: what each side reports, and a
reporter that sends only what changed."""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

BLOCKS_IN_USE = ("epd_buffer_blocks_in_use", "Blocks (or slots) in use per buffer pool")
SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]

ENCODER_POOLS = ["slots", "token_blocks", "visual_blocks"]
ENCODER_COUNTERS = {
    "seconds": ("epd_encode_seconds_total", "Seconds spent encoding (decode, vision tower, staging)"),
    "requests": ("epd_encode_requests_total", "Requests the encoder processed (including rejected ones)"),
    "images": ("epd_vision_images_total", "Images through the vision tower (cache hits and repeats within a "
               "batch are not)"),
    "hits": ("epd_encoder_cache_hits_total", "Images found in the encoder cache (no decode, no vision forward)"),
    "misses": ("epd_encoder_cache_misses_total", "Images looked up in the encoder cache and not found"),
}
ENCODER_GAUGES = {"cache_bytes": ("epd_encoder_cache_bytes", "Bytes of encoder outputs held in the encoder cache")}

LANGUAGE_POOLS = ["slots", "token_blocks", "visual_blocks", "kv_blocks"]
LANGUAGE_COUNTERS = {
    "bytes": ("epd_transfer_bytes_total", "Bytes pulled from encoders"),
    "seconds": ("epd_transfer_seconds_total", "Seconds spent in Mooncake reads"),
    "tokens": ("epd_output_tokens_total", "Output tokens generated"),
    "retries": ("epd_encode_retries_total", "Encodes sent again because their encoder became unreachable"),
    "prefix_queried": ("epd_prefix_cache_queried_tokens_total", "Prompt tokens of admitted requests, looked up "
                       "in the prefix cache"),
    "prefix_hit": ("epd_prefix_cache_hit_tokens_total", "Prompt tokens whose KV came from the prefix cache "
                   "(neither pulled nor prefilled)"),
}
LANGUAGE_GAUGES = {"cached_blocks": ("epd_prefix_cache_blocks", "KV blocks held in the prefix cache (in use by "
                                     "requests or kept for reuse)")}
# Per request, from its arrival at the language model (the ensemble and complete pass straight on).
LANGUAGE_HISTOGRAMS = {
    "ttft": ("epd_time_to_first_token_seconds", "Seconds from a request's arrival at the language model to "
             "its first token: prompt processing, encoding on the pool, queueing and prefill included"),
    "prompt": ("epd_prompt_seconds", "Seconds from a request's arrival to its prompt being ready at the engine "
               "(text only: tokenizing; with images: encoding on the pool, waiting for an encoder included)"),
    "queue": ("epd_queue_seconds", "Seconds a ready prompt waited for the engine to admit it (KV cache space, "
              "max_running)"),
    "request": ("epd_request_seconds", "Seconds from a request's arrival to its final response (finished, "
                "cancelled or failed in the engine)"),
}


class Metrics:
    """One model's counters and block gauges; report() sends only what changed since the last call."""

    def __init__(self, side: str, pools: list[str], counters: dict[str, tuple[str, str]],
                 histograms: dict[str, tuple[str, str]] | None = None, gauges: dict[str, tuple[str, str]] | None = None):
        family = pb_utils.MetricFamily
        histograms, gauges = histograms or {}, gauges or {}
        # Families must outlive their metrics, so they are kept here.
        self.families = [family(*BLOCKS_IN_USE, family.GAUGE)]
        self.families += [family(name, help_text, family.COUNTER) for name, help_text in counters.values()]
        self.families += [family(name, help_text, family.HISTOGRAM) for name, help_text in histograms.values()]
        self.gauges = {pool: self.families[0].Metric({"side": side, "pool": pool}) for pool in pools}
        self.counters = {key: f.Metric({}) for key, f in zip(counters, self.families[1:])}
        self.histograms = {key: f.Metric({}, buckets=SECONDS_BUCKETS)
                           for key, f in zip(histograms, self.families[1 + len(counters):])}
        for key, (name, help_text) in gauges.items():
            self.families.append(family(name, help_text, family.GAUGE))
            self.gauges[key] = self.families[-1].Metric({})
        self.last: dict[str, float] = {}
        self._lock = threading.Lock()

    def report(self, values: dict[str, float]) -> None:
        """Gauges (keyed by pool) set to their value; counters increased by their total's growth."""
        with self._lock:
            for key, value in values.items():
                before = self.last.get(key, 0)
                if value == before:
                    continue
                if key in self.counters:
                    self.counters[key].increment(value - before)
                else:
                    self.gauges[key].set(value)
                self.last[key] = value

    def observe(self, timings) -> None:
        """Drain (name, seconds) pairs from a deque into their histograms."""
        with self._lock:
            while timings:
                name, seconds = timings.popleft()
                self.histograms[name].observe(seconds)
