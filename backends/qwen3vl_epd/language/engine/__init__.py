"""The language serving engine: sequences, paged KV cache, scheduler, model runner, engine loop."""
