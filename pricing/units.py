"""Numbers for people: seconds, milliseconds and dollars as printed in tables, messages and reports.
Values stay in base units (`_s`, `_usd`) everywhere else."""

from __future__ import annotations


def fmt_s(value: float) -> str:
    return f"{value:.3g} s"


def fmt_ms(value: float) -> str:
    return f"{value * 1000:.3g} ms"


def fmt_usd(value: float) -> str:
    if value >= 100:
        return f"${value:,.0f}"
    return f"${value:.2f}" if value >= 1 else f"${value:.3g}"


def plus_minus(value: float, low: float | None, high: float | None) -> str:
    """'± 3%' for a 95% interval around value (the larger side), '± ?' when unbounded."""
    if low is None or high is None or value <= 0:
        return "± ?"
    return f"± {max(high - value, value - low) / value:.0%}"
