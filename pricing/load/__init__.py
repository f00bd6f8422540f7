"""The load generator: the streaming aiohttp client, SSE parsing, socket receive stamps, the event loop."""
