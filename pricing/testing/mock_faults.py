"""The faults the mock server injects on purpose: on every k-th request an HTTP 500, a connection
dropped mid-stream, a stall or a request accepted and never answered; and bursts of HTTP 503 (every
request for a while, as from a server shedding load)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Faults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    http500_every: int = Field(default=0, ge=0)  # 0 = never
    disconnect_every: int = Field(default=0, ge=0)  # drop the connection after 2 tokens
    stall_every: int = Field(default=0, ge=0)  # stop sending after 2 tokens for stall_s
    stall_s: float = Field(default=5.0, ge=0)
    hang_every: int = Field(default=0, ge=0)  # read the request, never send a byte (1: a hung server)
    # Every request arriving in the first burst_s of each burst_every_s (from the server's start)
    # gets HTTP 503; 0 = never.
    burst_every_s: float = Field(default=0.0, ge=0)
    burst_s: float = Field(default=0.0, ge=0)

    def refusal(self, n: int, started_ns: int, at_ns: int) -> tuple[int, str] | None:
        """The HTTP status and message request `n`, arriving at `at_ns`, gets instead of an answer
        (None: it is answered)."""
        if self.http500_every and n % self.http500_every == 0:
            return 500, "injected fault"
        if self.burst_every_s and self.burst_s and ((at_ns - started_ns) / 1e9) % self.burst_every_s < self.burst_s:
            return 503, "injected burst of 503s"
        return None

    def hangs(self, n: int) -> bool:
        return bool(self.hang_every) and n % self.hang_every == 0
