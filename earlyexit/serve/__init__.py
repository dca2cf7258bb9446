"""OpenAI-compatible HTTP serving over the engine (needs the [serve] extra)."""
