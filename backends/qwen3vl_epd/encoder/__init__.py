"""The encoder side: the vision tower, its cache, and the service the encoder model runs."""
