"""Servers with known answers for tests and benchmarks: the mock OpenAI server and its HTTP layer."""
