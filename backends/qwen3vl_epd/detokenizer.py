"""Incremental, UTF-8 safe detokenization with stop strings."""

from __future__ import annotations


class Detokenizer:
    """Feeds token ids, returns only the new text that is final (never half a character or a
    possible start of a stop string)."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def add(self, token: int) -> str:
        """Append one token; the text that can be sent now ('' when none)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        self.text = text
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s) + 1))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        return self._take(final=self.stopped)

    def flush(self) -> str:
        """Everything not sent yet, at the end of generation (an unfinished character included)."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
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
