"""SLO-driven prices for vLLM servers. Subpackages follow the pipeline: workload -> load ->
measure -> capacity -> cost -> report (serving runs the server, planning sizes fleets, testing
holds the mock servers); bench, price, plan, profile and quantize are the commands."""
