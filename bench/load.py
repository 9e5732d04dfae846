"""Host memory while loading a checkpoint: peak RSS over the process's own baseline, for each
half, with the weights bound for a device off the host and for the CPU itself. `meta` stands in
for the GPU: every tensor's pages are read as a copy to a GPU reads them, and what the host holds
then is loading's own cost. The default checkpoint has the real Qwen3-VL-30B-A3B dimensions with
3 of its 48 text layers, bf16, in 4 GB shards with the experts stored transposed, as the hub's
are (built once under checkpoints/, random weights; about 6 GB).

Run: .venv/bin/python bench/load.py [--checkpoint DIR] [--root CHECKOUT]   (--root: measure
another checkout's loader, e.g. a `git worktree` of the commit before, with this venv)
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from goals import verdict  # noqa: E402

GIB = 2**30
# Qwen3-VL-30B-A3B-Instruct's config.json, text layers cut from 48 to 3.
REAL_30B_A3B = {
    "text_config": {
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 3,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "initializer_range": 0.02,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                            "mrope_interleaved": True},
    },
    "vision_config": {
        "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 2048,
        "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24], "initializer_range": 0.02,
    },
}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reading(safe_open):
    """safe_open whose tensors have every page read (safetensors maps them; a copy to a GPU reads them)."""

    class Reading:
        def __init__(self, *args, **kwargs):
            self.f = safe_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            t = self.f.get_tensor(name)
            t.reshape(-1)[:: 4096 // t.element_size()].sum()  # one element per page
            return t

    return Reading


def hub_layout(checkpoint: Path) -> None:
    """Store the experts as the hub's checkpoints do ([E, H, 2I] / [E, I, H]), one shard at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            state = {n: f.get_tensor(n) for n in f.keys()}
            metadata = f.metadata()
        for name in [n for n in state if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
            state[name] = state[name].transpose(1, 2).contiguous()
        save_file(state, str(path) + ".tmp", metadata=metadata)
        del state
        Path(str(path) + ".tmp").rename(path)


def child(half: str, checkpoint: str, device: str) -> None:
    """Load one half, print its memory figures as JSON."""
    import torch

    from qwen3vl_epd.checkpoint.reader import load_config  # noqa: F401  (imports done before the baseline)

    if device == "meta":
        import qwen3vl_epd.checkpoint.reader as reader

        reader.safe_open = reading(reader.safe_open)
    baseline = status_kib("VmRSS")
    if half == "language":
        from qwen3vl_epd.language.model import LanguageModel

        module = LanguageModel(checkpoint, torch.bfloat16, device)
        params = list(module.model.parameters()) + list(module.lm_head.parameters())
    else:
        from qwen3vl_epd.encoder.vision import VisionEncoder

        params = list(VisionEncoder(checkpoint, torch.bfloat16, device).visual.parameters())
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())
    print(json.dumps({"peak": (status_kib("VmHWM") - baseline) * 1024, "weights": weights}))


def measure(root: Path, half: str, checkpoint: Path, device: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{root / 'backends'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, __file__, "--child", half, device, "--checkpoint", str(checkpoint)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "bench-30b-a3b-3l")
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--child", nargs=2, metavar=("HALF", "DEVICE"))
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], str(args.checkpoint), args.child[1])
    if not (args.checkpoint / "config.json").exists():
        import torch

        from qwen3vl_epd.checkpoint.tiny import build_tiny

        print(f"building {args.checkpoint} (real 30B-A3B dimensions, 3 text layers, bf16)", flush=True)
        build_tiny(args.checkpoint, overrides=REAL_30B_A3B, max_shard_size="4GB", dtype=torch.bfloat16)
        hub_layout(args.checkpoint)
    shard = max(p.stat().st_size for p in args.checkpoint.glob("*.safetensors"))
    print(f"checkpoint {args.checkpoint.name}: largest shard {shard / GIB:.2f} GiB; loader of {args.root}")
    print(f"{'half':<9} {'to':<5} {'weights GiB':>11} {'host peak GiB':>13} {'peak - weights':>14}")
    goals = []
    for half in ("language", "vision"):
        for device in ("meta", "cpu"):
            r = measure(args.root, half, args.checkpoint, device)
            extra = r["peak"] - (r["weights"] if device == "cpu" else 0)
            print(f"{half:<9} {device:<5} {r['weights'] / GIB:>11.2f} {r['peak'] / GIB:>13.2f} {extra / GIB:>14.2f}")
            goals.append((f"load_host_{half}_to_{'device' if device == 'meta' else 'cpu'}", extra / GIB))
    limit = shard / GIB + 1
    for name, value in goals:
        print(f"goal: {name}_gib {value:.2f} (target <= {limit:.2f}) {verdict(value, '<=', limit)}")


if __name__ == "__main__":
    main()
