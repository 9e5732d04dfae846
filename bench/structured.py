"""Step time of a decode batch of 16 with and without 8 rows constrained by a JSON schema, side by
side in alternating rounds: the grammar masks are computed on the host beside the forward, so the
constrained batch should cost little more than the free one.

Run: .venv/bin/python bench/structured.py [--checkpoint DIR] [--steps 40] [--rounds 3]
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from goals import verdict  # noqa: E402

from qwen3vl_epd.language.engine.kv_cache import PagedKVCache  # noqa: E402
from qwen3vl_epd.language.engine.model_runner import ModelRunner  # noqa: E402
from qwen3vl_epd.language.grammar import Grammars  # noqa: E402
from qwen3vl_epd.language.model import LanguageModel  # noqa: E402
from qwen3vl_epd.prompt.processor import Processor  # noqa: E402
from support.decoding import decode_batch, step_seconds  # noqa: E402

BATCH, CONSTRAINED, CONTEXT = 16, 8, 256
# A schema that stays open for the whole measurement: one long string field.
SCHEMA = {"type": "json_schema", "json_schema": {"name": "note", "schema": {
    "type": "object", "properties": {"text": {"type": "string", "maxLength": 2000}}, "required": ["text"],
    "additionalProperties": False}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "tiny"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the language model process runs (config.pbtxt torch_threads)
    model = LanguageModel(args.checkpoint)
    tc = model.config.text_config
    kv = PagedKVCache(tc.num_hidden_layers, BATCH * (CONTEXT + args.steps + 4) // 16 + 16, 16,
                      tc.num_key_value_heads, tc.head_dim, model.dtype)
    runner = ModelRunner(model)
    grammar = Grammars(Processor(args.checkpoint).tokenizer, tc.vocab_size).compile(SCHEMA)
    free, constrained = [], []
    for _ in range(args.rounds):
        free.append(step_seconds(runner, decode_batch(kv, BATCH, CONTEXT, args.steps), args.steps))
        rows = [grammar.matcher() for _ in range(CONSTRAINED)]
        constrained.append(step_seconds(runner, decode_batch(kv, BATCH, CONTEXT, args.steps, rows), args.steps))
    a, b = statistics.median(free), statistics.median(constrained)
    print(f"{Path(args.checkpoint).name}: decode batch {BATCH} at context {CONTEXT}, medians of {args.rounds} rounds "
          f"of {args.steps} steps")
    print(f"| rows constrained | step ms |\n|---|---|\n| 0 | {a * 1e3:.2f} |\n| {CONSTRAINED} | {b * 1e3:.2f} |")
    ratio = b / a
    print(f"goal: structured_step_ratio {ratio:.2f} (target <= 1.25) {verdict(ratio, '<=', 1.25)}")


if __name__ == "__main__":
    main()
