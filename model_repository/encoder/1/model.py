"""Triton adapter of the encoder: requests → qwen3vl_epd EncoderService → handles (BYTES)."""

from qwen3vl_epd import triton_adapter as ta
from qwen3vl_epd.errors import EpdError
from qwen3vl_epd.serving import EncodeRequest, EncoderService
from qwen3vl_epd.triton_io import prompt_fields, sampling_fields

COUNTERS = {
    "seconds": ("epd_encode_seconds_total", "Seconds spent encoding (decode, vision tower, staging)"),
    "requests": ("epd_encode_requests_total", "Requests the encoder processed (including rejected ones)"),
    "images": ("epd_vision_images_total", "Images through the vision tower (cache hits and repeats within a "
               "batch are not)"),
    "hits": ("epd_encoder_cache_hits_total", "Images found in the encoder cache (no decode, no vision forward)"),
    "misses": ("epd_encoder_cache_misses_total", "Images looked up in the encoder cache and not found"),
}
GAUGES = {"cache_bytes": ("epd_encoder_cache_bytes", "Bytes of encoder outputs held in the encoder cache")}


class TritonPythonModel:
    def initialize(self, args):
        config = ta.model_config(args)
        self.outputs = ta.Outputs(config)
        self.metrics = ta.Metrics("encoder", ["slots", "token_blocks", "visual_blocks"], COUNTERS, gauges=GAUGES)
        self.service = EncoderService(ta.settings(config), on_tick=self._metrics)

    def _metrics(self):
        """On the service's background thread, off the request path."""
        s, cache = self.service, self.service.cache
        self.metrics.report({**s.buffers.in_use(), "seconds": s.encode_seconds, "requests": s.encode_count,
                             "images": s.encoder.images_encoded, "hits": cache.hits if cache else 0,
                             "misses": cache.misses if cache else 0, "cache_bytes": cache.bytes if cache else 0})

    def execute(self, requests):
        parsed, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            get = lambda name, r=request: ta.read(r, name)  # noqa: E731
            try:
                parsed.append((i, EncodeRequest(*prompt_fields(get), sampling_fields(get))))
            except EpdError as e:
                responses[i] = ta.exception_response(e)
        results = self.service.encode([r for _, r in parsed])
        for (i, _), result in zip(parsed, results):
            if isinstance(result, Exception):
                responses[i] = ta.exception_response(result)
            else:
                responses[i] = self.outputs.response(handle=result)
        return responses

    def finalize(self):
        self.service.close()
