"""The mock server's prefix cache and `/metrics` page: vLLM's automatic prefix caching in outline
(whole blocks of token ids, each keyed by its content and everything before it) and the few
Prometheus series the probe's telemetry reads, so session replay is testable without vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

# TTFT histogram bounds, vLLM's first few (seconds).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
VOCAB = 30_000


def answer_ids(n: int, osl: int) -> list[int]:
    """The ids the mock 'generates' for request n: fixed per request, different between requests."""
    return [1 + (n * 7919 + i * 104_729) % VOCAB for i in range(osl)]


@dataclass
class PrefixCache:
    """Blocks of `block_tokens` ids, never evicted. A prompt's hit is its longest run of cached
    blocks from the start, short of its last token (which is always computed, as in vLLM)."""

    block_tokens: int
    blocks: set[int] = field(default_factory=set)
    queries_tokens: int = 0
    hits_tokens: int = 0

    def _keys(self, ids: list[int]) -> Iterator[int]:
        key = 0
        for end in range(self.block_tokens, len(ids) + 1, self.block_tokens):
            key = hash((key, tuple(ids[end - self.block_tokens:end])))
            yield key

    def lookup(self, prompt: list[int]) -> int:
        """Cached tokens of this prompt's prefix, counted as vLLM's /metrics counts them."""
        hit = 0
        for key in self._keys(prompt[:-1]):
            if key not in self.blocks:
                break
            hit += self.block_tokens
        self.queries_tokens += len(prompt)
        self.hits_tokens += hit
        return hit

    def insert(self, computed: list[int]) -> None:
        """The full blocks of what the server computed: the prompt and all but the last answer token."""
        self.blocks.update(self._keys(computed))


def metrics_text(cache: PrefixCache | None, ttfts_s: Iterable[float]) -> str:
    """The prefix-cache counters and the TTFT histogram, in vLLM's names."""
    ttfts = sorted(ttfts_s)
    lines = []
    for name, value in (("prefix_cache_queries", cache.queries_tokens if cache else 0),
                        ("prefix_cache_hits", cache.hits_tokens if cache else 0)):
        lines += [f"# TYPE vllm:{name}_total counter", f'vllm:{name}_total{{engine="0"}} {float(value)}']
    lines.append("# TYPE vllm:time_to_first_token_seconds histogram")
    for le in (*TTFT_BUCKETS_S, float("inf")):
        count = sum(1 for t in ttfts if t <= le)
        lines.append(f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="{"+Inf" if le == float("inf") else le}"}} '
                     f"{float(count)}")
    lines += [f'vllm:time_to_first_token_seconds_sum{{engine="0"}} {float(sum(ttfts))}',
              f'vllm:time_to_first_token_seconds_count{{engine="0"}} {float(len(ttfts))}']
    return "\n".join(lines) + "\n"
