"""The OpenAI door's own metrics on its /metrics (Prometheus text): requests by endpoint and status,
request seconds, time to the first token, tokens in and out. tritonserver's port has the models'."""

from __future__ import annotations

import time
from collections import defaultdict

from aiohttp import web

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


class DoorMetrics:
    def __init__(self):
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.prompt_tokens = self.completion_tokens = 0
        self.in_flight = 0

    @staticmethod
    def _endpoint(request: web.Request) -> str | None:
        return next((e for e in ENDPOINTS if request.path.startswith(e)), None)

    def start(self, request: web.Request) -> None:
        request["epd_started"] = time.perf_counter()
        self.in_flight += self._endpoint(request) is not None

    def first_token(self, request: web.Request) -> None:
        self.ttft_sum += time.perf_counter() - request["epd_started"]
        self.ttft_count += 1

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def request(self, request: web.Request, status: int) -> None:
        if (endpoint := self._endpoint(request)) is not None:
            self.in_flight -= 1
            self.requests[endpoint, status] += 1
            self.seconds[endpoint] += time.perf_counter() - request["epd_started"]

    def render(self) -> str:
        lines = ["# TYPE epd_openai_requests_total counter"]
        lines += [f'epd_openai_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
        lines += ["# TYPE epd_openai_request_seconds_total counter"]
        lines += [f'epd_openai_request_seconds_total{{endpoint="{e}"}} {v:.6f}' for e, v in sorted(self.seconds.items())]
        lines += ["# TYPE epd_openai_time_to_first_token_seconds summary",
                  f"epd_openai_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                  f"epd_openai_time_to_first_token_seconds_count {self.ttft_count}",
                  "# TYPE epd_openai_prompt_tokens_total counter", f"epd_openai_prompt_tokens_total {self.prompt_tokens}",
                  "# TYPE epd_openai_completion_tokens_total counter",
                  f"epd_openai_completion_tokens_total {self.completion_tokens}",
                  "# TYPE epd_openai_requests_in_flight gauge", f"epd_openai_requests_in_flight {self.in_flight}"]
        return "\n".join(lines) + "\n"
