"""The server's counters and latency histograms, rendered in Prometheus' text exposition format (version 0.0.4)."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        index = bisect_left(self.buckets, value)
        if index < len(self.buckets):
            self.counts[index] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        cumulative, out = 0, []
        for bound, n in zip(self.buckets, self.counts, strict=True):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """What /metrics reports; `record_*` may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency = Histogram()
        self.time_to_first_token = Histogram()

    def record_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def record_generation(self, prompt_tokens: int, completion_tokens: int, latency: float,
                          time_to_first_token: float | None) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.latency.observe(latency)
            if time_to_first_token is not None:
                self.time_to_first_token.observe(time_to_first_token)

    def render(self, live: dict[str, tuple[str, str, float]]) -> str:
        """The exposition text; `live` holds the values read at scrape time: name -> (type, help, value)."""
        with self._lock:
            lines = ["# HELP lmforge_requests_total HTTP requests answered, by endpoint and status",
                     "# TYPE lmforge_requests_total counter"]
            lines += [f'lmforge_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}'
                      for (endpoint, status), n in sorted(self.requests.items())]
            for name, text, value in (
                    ("lmforge_prompt_tokens_total", "prompt tokens of completed generation requests",
                     self.prompt_tokens),
                    ("lmforge_completion_tokens_total", "tokens generated for clients", self.completion_tokens)):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {value}"]
            for name, text, histogram in (
                    ("lmforge_request_latency_seconds", "time from request to last token", self.latency),
                    ("lmforge_time_to_first_token_seconds", "time from request to first token",
                     self.time_to_first_token)):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *histogram.lines(name)]
        for name, (kind, text, value) in live.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"
