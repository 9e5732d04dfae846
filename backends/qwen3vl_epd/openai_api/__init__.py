"""An OpenAI-compatible HTTP door (/v1/chat/completions) onto the Triton models."""
