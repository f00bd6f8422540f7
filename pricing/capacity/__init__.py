"""Capacity: the search over load levels, the sweep that runs it, and which probe sets a tier's capacity."""
