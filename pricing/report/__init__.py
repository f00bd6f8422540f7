"""Output for people: rich console tables, progress, the self-contained Plotly HTML report."""
