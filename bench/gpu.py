"""The GPU figures, ready for a lent device: real Qwen3-VL-30B-A3B (or 8B) shapes with random
weights made on the device (no files), fewer text layers than the real model (per-layer costs
scaled to the real depth, and said so). Measured in one run: decode step time at batch 1/8/32/64,
prefill tokens/s, the vision tower on a 1024² image, and the Mooncake pull of its embeddings and
DeepStack rows; each against its roofline from the same run (bytes ÷ the bandwidth of a large
device copy; prefill also FLOPs ÷ a large matmul's rate).

Run: python bench/gpu.py [--model 30b-a3b|8b] [--layers N] [--device cuda:0]
     python bench/gpu.py --smoke    (the tiny model on CPU in seconds: the tests run this)
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from goals import verdict  # noqa: E402
from load import REAL_30B_A3B  # noqa: E402

from qwen3vl_epd.checkpoint.tiny import tiny_config, write_config_files  # noqa: E402
from qwen3vl_epd.devices import visual_device  # noqa: E402
from qwen3vl_epd.encoder.vision import VisionEncoder  # noqa: E402
from qwen3vl_epd.language.engine.attention import choose_backend  # noqa: E402
from qwen3vl_epd.language.engine.kv_cache import PagedKVCache  # noqa: E402
from qwen3vl_epd.language.engine.model_runner import ModelRunner  # noqa: E402
from qwen3vl_epd.language.model import LanguageModel  # noqa: E402
from qwen3vl_epd.language.sampling import Sampler, SamplingParams  # noqa: E402
from qwen3vl_epd.prompt.encoded import EncodedPrompt  # noqa: E402
from qwen3vl_epd.prompt.processor import Processor  # noqa: E402
from support.prompts import noise_jpeg  # noqa: E402

QWEN3_VL_8B = {  # Qwen3-VL-8B-Instruct's config.json
    "text_config": {
        "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "initializer_range": 0.02,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                            "mrope_interleaved": True},
    },
    "vision_config": {**REAL_30B_A3B["vision_config"], "out_hidden_size": 4096},
}
MODELS = {"30b-a3b": (False, REAL_30B_A3B, 48), "8b": (True, QWEN3_VL_8B, 36)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a large copy on `device` (read + write)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, 5)


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, device, 5)


def weight_bytes(model: LanguageModel) -> tuple[int, int, int]:
    """(bytes every token reads but the embedding table, bytes of one layer's one expert, experts per layer)."""
    dense = expert = experts = 0
    for name, p in list(model.model.named_parameters()) + list(model.lm_head.named_parameters()):
        size = p.numel() * p.element_size()
        if ".mlp.experts." in name:
            experts = p.shape[0]
            expert += size // experts
        elif "embed_tokens" not in name:
            dense += size
    layers = len(model.model.layers)
    return dense, expert // max(layers, 1), experts


def decode_bytes(model: LanguageModel, batch: int, context: int, top_k: int) -> float:
    """Bytes one decode step reads: weights (the experts the batch routes to, expected) and KV."""
    dense, expert, experts = weight_bytes(model)
    layers = len(model.model.layers)
    touched = experts * (1 - (1 - top_k / experts) ** batch) if experts else 0
    tc = model.config.text_config
    kv = batch * context * layers * 2 * tc.num_key_value_heads * tc.head_dim * model.dtype.itemsize
    return dense + layers * touched * expert + kv


def decode_steps(model, runner, kv, batches, context, repeats):
    out = {}
    for b in batches:
        seqs = []
        for _ in range(b):
            s = kv.allocate_sequence(context + repeats + 2)
            s.length = context  # as if prefilled: the step's cost does not depend on the values
            params = SamplingParams()
            seqs.append(SimpleNamespace(kv=s, tokens=[1], prompt_len=context, mrope_delta=0, params=params, grammar=None,
                                        sampler=Sampler(params)))
        device = model.device
        out[b] = timed(lambda: runner.sample(*runner.run([], seqs)), device, repeats)
        for s in seqs:
            s.kv.free()
    return out


def prefill_rate(model, runner, kv, tokens: int, repeats: int) -> float:
    ids = torch.randint(1000, 100000, (tokens,), dtype=torch.int32)
    rows = EncodedPrompt(ids, torch.arange(tokens, dtype=torch.int32)[:, None].expand(-1, 3).contiguous(),
                         torch.zeros(0, model.hidden_size, dtype=model.dtype), torch.zeros(0, 0, dtype=model.dtype),
                         0, [])

    def once():
        s = kv.allocate_sequence(tokens)
        params = SamplingParams()
        seq = SimpleNamespace(kv=s, prefilled=0, prompt_len=tokens, tokens=[], params=params, sampler=Sampler(params),
                              grammar=None)
        runner.sample(*runner.run([runner.prepare(seq, rows)], []))
        s.free()

    return tokens / timed(once, model.device, repeats)


def pull_seconds(nbytes: int, device: torch.device, repeats: int) -> float | str:
    """One Mooncake read of nbytes between two engines of this process (loopback), or why not."""
    try:
        from qwen3vl_epd.transfer.transport import MooncakeTransport

        a, b = MooncakeTransport(), MooncakeTransport()
    except Exception as e:  # noqa: BLE001 - a device machine without Mooncake still gets the rest
        return f"skipped: {e!r}"
    where = visual_device(device)
    src = torch.ones(nbytes, dtype=torch.uint8, device=where)
    dst = torch.zeros_like(src)
    a.register({"src": src})
    b.register({"dst": dst})
    return timed(lambda: b.read(a.session_id, [dst.data_ptr()], [src.data_ptr()], [nbytes], "bench"), where, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="30b-a3b")
    parser.add_argument("--layers", type=int, default=12, help="text layers built (real depth: 48 / 36)")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else args.device)
    dense, overrides, real_layers = MODELS[args.model]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.smoke:  # the embedded tiny shapes
        dense, overrides, real_layers, args.layers = False, {}, 4, 4
    overrides = {**overrides, "text_config": {**overrides.get("text_config", {}), "num_hidden_layers": args.layers}}
    batches, context = ((1, 2), 64) if args.smoke else ((1, 8, 32, 64), 1024)
    repeats, prefill_tokens, side = (2, 64, 128) if args.smoke else (10, 2048, 1024)
    scale = real_layers / args.layers
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_config(dense, overrides, dtype)
        write_config_files(Path(tmp), config)
        bw = bandwidth(device, 2**26 if args.smoke else 2**32)
        flops = matmul_rate(device, 512 if args.smoke else 8192, dtype)
        print(f"{args.model if not args.smoke else 'tiny'} on {device}, {dtype}, {args.layers} of {real_layers} text "
              f"layers (layer costs ×{scale:g}); copy {bw / 1e9:.1f} GB/s, matmul {flops / 1e12:.2f} TFLOP/s")
        model = LanguageModel(tmp, dtype, device, random_weights=True)
        tc = model.config.text_config
        block = 256 if device.type == "cuda" else 16
        kv = PagedKVCache(tc.num_hidden_layers, (max(batches) * (context + repeats + 2) + prefill_tokens) // block + 64,
                          block, tc.num_key_value_heads, tc.head_dim, dtype, device)
        runner = ModelRunner(model, choose_backend("auto", device, dtype, block, tc.head_dim))
        top_k = getattr(tc, "num_experts_per_tok", 0)
        fractions = {}
        print(f"attention {runner.attention_backend}; decode at context {context}:")
        for b, s in decode_steps(model, runner, kv, batches, context, repeats).items():
            roof = decode_bytes(model, b, context, top_k) / bw
            fractions[f"decode_b{b}"] = roof / s
            print(f"  batch {b:>3}: step {s * 1e3:8.2f} ms (×{scale:g}: {s * scale * 1e3:8.2f} ms), "
                  f"{roof / s:.2f} of the bandwidth roofline")
        rate = prefill_rate(model, runner, kv, prefill_tokens, max(1, repeats // 5))
        dense_b, expert_b, _ = weight_bytes(model)
        active = (dense_b + len(model.model.layers) * top_k * expert_b) / dtype.itemsize
        roof = max(2 * active * prefill_tokens / flops, decode_bytes(model, 1, prefill_tokens, top_k) / bw)
        fractions["prefill"] = roof * rate / prefill_tokens
        print(f"prefill {prefill_tokens} tokens: {rate:,.0f} tokens/s (÷{scale:g}: {rate / scale:,.0f}), "
              f"{fractions['prefill']:.2f} of the roofline")
        del model, kv, runner
        encoder, processor = VisionEncoder(tmp, dtype, device, random_weights=True), Processor(tmp)
        prompt = processor.process("<image>", [noise_jpeg(side)])
        s = timed(lambda: encoder.encode([prompt]), device, max(1, repeats // 5))
        visual = int(prompt.image_grid_thw.prod(-1).sum()) // encoder.merge_unit
        nbytes = visual * encoder.hidden_size * dtype.itemsize * (1 + encoder.num_deepstack)
        print(f"vision {side}x{side}: {s * 1e3:.1f} ms, {visual} visual tokens, {nbytes / 1e6:.1f} MB staged")
        pull = pull_seconds(nbytes, device, repeats)
        if isinstance(pull, str):
            print(f"pull of {nbytes / 1e6:.1f} MB: {pull}")
        else:
            print(f"pull of {nbytes / 1e6:.1f} MB: {pull * 1e3:.2f} ms, {nbytes / pull / 1e9:.2f} GB/s, "
                  f"{nbytes / bandwidth(visual_device(device), 2**26) / pull:.2f} of a copy in its memory")
    for name in ("decode_b1", f"decode_b{max(batches)}", "prefill"):
        value = fractions[name]
        print(f"goal: {name}_roofline_fraction {value:.2f} (target >= 0.5) {verdict(value, '>=', 0.5)}")


if __name__ == "__main__":
    main()
