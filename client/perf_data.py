"""Writes a perf_analyzer --input-data JSON with real image bytes and prompts.

python -m client.perf_data OUT.json [--image FILE ...] [--max-tokens 16] [--stream]
Images travel as base64 data URLs in BYTES elements, which the encoder decodes like raw bytes.
"""

import argparse
import json
from pathlib import Path

from client import data_url

PROMPTS = ["Describe this image.", "What is in the picture?", "Write a short caption.", "List three colors you see."]


def perf_data(images: list[bytes], max_tokens: int = 16, stream: bool = True) -> dict:
    """One entry per prompt, each with one image (cycled) and the sampling fields."""
    entries = []
    for i, prompt in enumerate(PROMPTS):
        entry = {
            "text_input": {"content": [prompt], "shape": [1]},
            "max_tokens": {"content": [max_tokens], "shape": [1]},
            "stream": {"content": [stream], "shape": [1]},
        }
        if images:
            entry["image"] = {"content": [data_url(images[i % len(images)])], "shape": [1]}
        entries.append(entry)
    return {"data": entries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--image", action="append", default=[])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--no-stream", action="store_true")
    args = parser.parse_args()
    data = perf_data([Path(p).read_bytes() for p in args.image], args.max_tokens, not args.no_stream)
    Path(args.out).write_text(json.dumps(data))
    print(args.out)


if __name__ == "__main__":
    main()
