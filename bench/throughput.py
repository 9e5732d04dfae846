"""Output tok/s and time to first token through the running server's entry model, the language model
(gRPC streaming), at concurrency 1, 4, 16, next to transformers' generate serving the same
requests one by one, and the served TTFT next to the sum of the in-process stage times. All in
one run.

Run: .venv/bin/python bench/throughput.py [--requests 16] [--max-tokens 64]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from goals import verdict  # noqa: E402

from client import load  # noqa: E402
from qwen3vl_epd.checkpoint.tiny import build_tiny  # noqa: E402
from qwen3vl_epd.encoder.vision import VisionEncoder  # noqa: E402
from qwen3vl_epd.language.model import KVCache, LanguageModel  # noqa: E402
from qwen3vl_epd.prompt.processor import Processor  # noqa: E402
from qwen3vl_epd.settings import DEFAULT_CHECKPOINT, LanguageSettings, pbtxt_parameters  # noqa: E402
from qwen3vl_epd.transfer.buffers import MultimodalDataBuffers  # noqa: E402
from qwen3vl_epd.transfer.puller import Puller  # noqa: E402
from qwen3vl_epd.transfer.signing import (
    HandleKeys,  # noqa: E402
    new_key,  # noqa: E402
)
from qwen3vl_epd.transfer.stager import Stager  # noqa: E402
from qwen3vl_epd.transfer.transport import MooncakeTransport  # noqa: E402
from support.tritonserver import NO_CACHES, TritonServer  # noqa: E402

IMAGES = ROOT.parent / "shared" / "testdata" / "images"
MIX = [("Describe this image.", ["small_64x64.webp"]), ("What is in the picture?", ["portrait_300x500.png"]),
       ("Tell me a story about the sea.", []), ("Compare <image> and <image>.", ["cmyk.jpg", "grayscale.png"])]


def requests(n: int) -> list[tuple[str, list[bytes]]]:
    return [(MIX[i % len(MIX)][0], [(IMAGES / f).read_bytes() for f in MIX[i % len(MIX)][1]]) for i in range(n)]


def transformers_one_by_one(checkpoint: str, reqs, max_tokens: int) -> float:
    """tok/s of transformers' generate, one request after the other, same prompts and lengths."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = Processor(checkpoint)
    tokens, start = 0, time.perf_counter()
    for text, images in reqs:
        p = processor.process(text, images)
        ids = p.fill_ids[None]
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == 151655).int())
        if p.num_images:
            kw.update(pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw)
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - start)


def stage_times(checkpoint: str, reqs, threads: int) -> tuple[float, float, float]:
    """Mean seconds of encode (decode + vision tower), pull (stage + Mooncake read), first prefill,
    with the served models' torch thread count."""
    torch.set_num_threads(threads)
    processor, encoder, lm = Processor(checkpoint), VisionEncoder(checkpoint), LanguageModel(checkpoint)
    enc_buf = MultimodalDataBuffers(encoder.hidden_size, encoder.num_deepstack, encoder.dtype)
    lang_buf = MultimodalDataBuffers(lm.hidden_size, lm.num_deepstack, lm.dtype)
    keys = HandleKeys(new_key())
    stager = Stager(enc_buf, MooncakeTransport(), keys)
    puller = Puller(lang_buf, MooncakeTransport(), keys)
    enc, pull, prefill = [], [], []
    for text, images in reqs:
        t0 = time.perf_counter()
        encoded = encoder.encode([processor.process(text, images)])[0]
        t1 = time.perf_counter()
        with puller.open(stager.stage(encoded)) as session:
            chunk = session.read_chunk(0)
            t2 = time.perf_counter()
            lm.prefill(chunk, KVCache(len(lm.model.layers)))
            t3 = time.perf_counter()
        stager.reclaim()
        enc.append(t1 - t0), pull.append(t2 - t1), prefill.append(t3 - t2)
    stager.close(), puller.close()
    return statistics.mean(enc), statistics.mean(pull), statistics.mean(prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    checkpoint = str(DEFAULT_CHECKPOINT)
    if not (DEFAULT_CHECKPOINT / "model.safetensors").exists():
        build_tiny(DEFAULT_CHECKPOINT)
    reqs = requests(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        server = TritonServer(Path(tmp) / "server.log", NO_CACHES)  # the requests repeat: measure the uncached path
        try:
            load.run(server.grpc_url, reqs[:4], 2, 4)  # warm-up
            runs = {c: load.run(server.grpc_url, reqs, c, args.max_tokens) for c in (1, 4, 16)}
        finally:
            server.stop()
    baseline = transformers_one_by_one(checkpoint, reqs, args.max_tokens)
    served = LanguageSettings.from_parameters(pbtxt_parameters(ROOT / "model_repository" / "language" / "config.pbtxt"))
    threads = served.torch_threads or torch.get_num_threads()
    enc, pull, prefill = stage_times(checkpoint, reqs, threads)
    print(f"tiny checkpoint, {args.requests} requests (mixed text / 1 / 2 images), {args.max_tokens} output tokens each")
    print("| concurrency | output tok/s | mean TTFT ms | mean ITL ms | vs concurrency 1 | vs transformers |")
    print("|---|---|---|---|---|---|")
    for c, r in runs.items():
        print(f"| {c} | {r['tok_per_s']:.1f} | {r['mean_ttft_s'] * 1e3:.1f} | {r['mean_itl_s'] * 1e3:.1f} | "
              f"{r['tok_per_s'] / runs[1]['tok_per_s']:.2f}x | {r['tok_per_s'] / baseline:.2f}x |")
    print(f"| transformers generate, one by one | {baseline:.1f} | | | | 1.00x |")
    in_process = enc + pull + prefill
    ttft = runs[1]["mean_ttft_s"]
    print(f"\nTTFT at concurrency 1 ({threads} torch thread(s) per model, as served): served {ttft * 1e3:.1f} ms; in-process encode {enc * 1e3:.1f} + pull "
          f"{pull * 1e3:.1f} + first prefill {prefill * 1e3:.1f} = {in_process * 1e3:.1f} ms; "
          f"ratio {ttft / in_process:.2f}")
    c16, vs_tf, vs_stages = runs[16]["tok_per_s"] / runs[1]["tok_per_s"], runs[16]["tok_per_s"] / baseline, ttft / in_process
    print(f"goal: scaling_c16_vs_c1 {c16:.2f} (target >= 6) {verdict(c16, '>=', 6)}")
    print(f"goal: c16_vs_transformers {vs_tf:.2f} (target >= 4) {verdict(vs_tf, '>=', 4)}")
    print(f"goal: ttft_vs_in_process {vs_stages:.2f} (target <= 1.3) {verdict(vs_stages, '<=', 1.3)}")


if __name__ == "__main__":
    main()
