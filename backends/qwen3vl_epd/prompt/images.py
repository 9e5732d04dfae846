"""Image inputs: data URLs and raw bytes decoded to RGB within the request's limits."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_transforms import convert_to_rgb

from qwen3vl_epd.errors import ImageDecodeError, ImageTooLargeError
from qwen3vl_epd.prompt.limits import Limits, element_bytes


def image_data(data: bytes, index: int, limits: Limits) -> bytes:
    """An `image` element's raw bytes (a base64 data URL decoded), within the encoded-bytes limit."""
    return element_bytes(data, index, limits.max_image_bytes)


def decode_image(data: bytes, index: int, limits: Limits) -> Image.Image:
    """Raw JPEG/PNG/WebP bytes (or a base64 data URL, for JSON clients) → RGB image, enforcing
    byte and pixel limits before decoding."""
    return decode_raw(image_data(data, index, limits), index, limits)


def decode_raw(data: bytes, index: int, limits: Limits) -> Image.Image:
    """Raw image bytes already within the byte limit (image_data) → RGB image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(
            index, f"over the pixel limit of {limits.max_image_pixels}, rejected from the header: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(index, "cannot decode image: not a JPEG, PNG or WebP file") from None
    except (OSError, ValueError) as e:
        raise ImageDecodeError(index, f"cannot decode image: {e}") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise ImageTooLargeError(
            index, f"{width}x{height} = {width * height} pixels is over the pixel limit of {limits.max_image_pixels}"
        )
    try:
        image.seek(0)  # animated images: the first frame
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(index, f"cannot decode image: {e}") from None
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale: scale to 8 bits; PIL's own convert would clip everything above 255.
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        image = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image  # what convert_to_rgb would return, without its copy through numpy
    return Image.fromarray(convert_to_rgb(image, return_numpy=True))
