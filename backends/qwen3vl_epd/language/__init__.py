"""The language side: the text model, sampling, detokenizing, the encoder pool, requests, the engine."""
