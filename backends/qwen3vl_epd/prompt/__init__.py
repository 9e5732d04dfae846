"""The prompt contract both sides share: the encoded prompt, processing, images, messages, prefix hashes."""
