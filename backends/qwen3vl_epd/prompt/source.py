"""PromptSource: where the engine gets a prompt's rows, chunk by chunk. A PullSession (rows staged
by an encoder, pulled over Mooncake) and a LocalPrompt (text only, processed here) are the two."""

from __future__ import annotations

from typing import Protocol

from qwen3vl_epd.prompt.encoded import EncodedPrompt


class PromptSource(Protocol):
    name: str  # for error messages
    length: int  # prompt tokens
    mrope_delta: int
    block_hashes: list[bytes]  # the prompt's prefix hash chain

    def fetch(self, start: int, end: int, wait_for_blocks: bool = False) -> EncodedPrompt | None:
        """Tokens [start, end) with their own rows once they are here, else None (asked again)."""

    def release_chunk(self) -> None:
        """The rows last fetched are used up (their views become invalid)."""

    def close(self) -> object:
        """The prompt is done with: whatever it holds (an encoder's slot) is given back."""


class LocalPrompt:
    """The prompt source of a text-only request: nothing to pull, no encoder slot to release."""

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
