"""LocalPrompt: a prompt whose rows are already on this server (text only, processed here)."""

from __future__ import annotations

from ..encoder import EncodedPrompt


class LocalPrompt:
    """The prompt source of a text-only request: what a PullSession offers the engine (chunks,
    length, M-RoPE delta), with nothing to pull and no encoder slot to release."""

    name = "text prompt"

    def __init__(self, prompt: EncodedPrompt, chunk_tokens: int):
        self.prompt, self.chunk_tokens = prompt, chunk_tokens

    @property
    def length(self) -> int:
        return self.prompt.length

    @property
    def mrope_delta(self) -> int:
        return self.prompt.mrope_delta

    @property
    def block_hashes(self) -> list[bytes]:
        return self.prompt.block_hashes()

    def fetch(self, start: int, end: int, wait_for_blocks: bool = False) -> EncodedPrompt:
        return self.prompt.slice(start, end)

    def release_chunk(self) -> None:
        pass

    def close(self) -> None:
        return None
