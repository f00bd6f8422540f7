"""What a probe measured: window statistics, SLO verdicts, GPU energy, vLLM /metrics."""
