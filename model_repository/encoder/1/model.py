"""Triton adapter of the encoder: requests → qwen3vl_epd EncoderService → handles (BYTES)."""

from qwen3vl_epd.encoder.service import EncodeJob, EncoderService
from qwen3vl_epd.errors import EpdError
from qwen3vl_epd.liveness import Heartbeat
from qwen3vl_epd.settings import EncoderSettings
from qwen3vl_epd.triton_backend import adapter as ta
from qwen3vl_epd.triton_backend import metrics as m
from qwen3vl_epd.triton_backend.inputs import byte_items, first, sampling_fields, text_field, video_options


class TritonPythonModel:
    def initialize(self, args):
        config, settings = ta.start(args, EncoderSettings)
        self.outputs = ta.Outputs(config)
        self.metrics = m.Metrics("encoder", m.ENCODER_POOLS, m.ENCODER_COUNTERS, gauges=m.ENCODER_GAUGES)
        self.service = EncoderService(settings, on_tick=self._metrics)
        self.heartbeat = Heartbeat(self.service.progress)  # for the supervisor: busy is not hung

    def _metrics(self):
        """On the service's background thread, off the request path."""
        s = getattr(self, "service", None)  # the first round may come before __init__ has returned
        if s is None:
            return
        cache = s.cache
        self.metrics.report({**s.buffers.in_use(), "seconds": s.encode_seconds, "requests": s.encode_count,
                             "images": s.encoder.images_encoded, "hits": cache.hits if cache else 0,
                             "misses": cache.misses if cache else 0, "cache_bytes": cache.bytes if cache else 0})

    def execute(self, requests):
        parsed, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            get = lambda name, r=request: ta.read(r, name)  # noqa: E731
            try:
                job = EncodeJob(text_field(get, "text_input"), byte_items(get("image")),
                                bool(first(get("raw_prompt")) or False), sampling_fields(get), byte_items(get("video")),
                                video_options(get), bool(first(get("language_idle")) or False))
                parsed.append((i, job))
            except EpdError as e:
                responses[i] = ta.exception_response(e)
        results = self.service.encode([job for _, job in parsed])
        for (i, _), result in zip(parsed, results):
            if isinstance(result, Exception):
                responses[i] = ta.exception_response(result)
            else:
                responses[i] = self.outputs.response(handle=result)
        return responses

    def finalize(self):
        self.heartbeat.close()
        self.service.close()
