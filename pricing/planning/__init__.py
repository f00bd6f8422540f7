"""Fleet planning from priced configs: sizing by hour, autoscaling, spot mix, cascades, budgets."""
