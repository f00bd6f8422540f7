"""Traffic: profiles from WildChat or local files, their sources, and the prompts sent."""
