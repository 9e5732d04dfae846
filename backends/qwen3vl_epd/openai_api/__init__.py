"""An OpenAI-compatible HTTP server (/v1/chat/completions) onto the Triton models."""
