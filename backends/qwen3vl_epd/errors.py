"""Typed errors; `code` is the Triton error code the adapters map each one to."""


class EpdError(Exception):
    """Base class; `code` names the Triton error code (INVALID_ARG, UNAVAILABLE, ...)."""

    code = "INTERNAL"


class InvalidInputError(EpdError):
    """The request itself is wrong; the message names the field and the limit."""

    code = "INVALID_ARG"


class MediaError(InvalidInputError):
    """An image or video was rejected; `index` is its position in the request (0-based)."""

    kind: str

    def __init__(self, index: int, message: str):
        super().__init__(f"{self.kind} {index}: {message}")
        self.index = index


class ImageError(MediaError):
    kind = "image"


class ImageDecodeError(ImageError):
    """The bytes are not a decodable JPEG, PNG or WebP image."""


class ImageTooLargeError(ImageError):
    """Over the encoded-bytes or pixel limit, or an aspect ratio the processor cannot resize."""


class VideoError(MediaError):
    kind = "video"


class TooManyImagesError(InvalidInputError):
    """More images than the per-prompt limit."""


class PromptTooLongError(InvalidInputError):
    """The expanded prompt exceeds the maximum model length."""


class UnavailableError(EpdError):
    """Capacity or peer problem; the client may retry."""

    code = "UNAVAILABLE"


class HandleError(InvalidInputError):
    """A handle that is malformed, for another model, from a peer not allowed, or forged."""


class HandleExpiredError(UnavailableError):
    """The encoder reclaimed the slot (released earlier or older than handle_ttl_s)."""


class PeerError(UnavailableError):
    """The encoder peer is unreachable or died during a transfer."""


class PoolFullError(UnavailableError):
    """A buffer pool stayed full for the whole bounded wait."""
