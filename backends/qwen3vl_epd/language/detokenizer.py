"""Incremental, UTF-8 safe detokenization with stop strings."""

from __future__ import annotations


class Detokenizer:
    """Feeds token ids, returns only the new text that is final (never half a character or a
    possible start of a stop string). Each token decodes a short window, not the whole output."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.tokens: list[int] = []
        # tokens[prefix:read] is context already turned into text; tokens[read:] is not yet.
        self.prefix = self.read = 0
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append one token; the text that can be sent now ('' when none)."""
        self.tokens.append(token)
        before = self._decode(self.tokens[self.prefix : self.read])
        after = self._decode(self.tokens[self.prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):  # a multi-byte character is not complete yet
            return ""
        self.text += after[len(before) :]
        self.prefix, self.read = self.read, len(self.tokens)
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s) + 1))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        return self._take(final=self.stopped)

    def flush(self) -> str:
        """Everything not sent yet, at the end of generation (an unfinished character included)."""
        if not self.stopped and self.read < len(self.tokens):
            before = self._decode(self.tokens[self.prefix : self.read])
            self.text += self._decode(self.tokens[self.prefix :])[len(before) :]
            self.read = len(self.tokens)
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end -= self._held_back()
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return hold
