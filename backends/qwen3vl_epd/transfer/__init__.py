"""Mooncake transfer of the five buffers: block memory, the signed handle, the transport,
encoder-side staging and language-side pulls."""
