"""aiperf (NVIDIA's successor to genai-perf) against a supervised server, synthetic images, both
endpoints in one run: the OpenAI server (`--endpoint-type chat`) and Triton's `generate_stream` on
`language` (aiperf's template endpoint). aiperf is installed on first use into .venv-aiperf/
(its own environment: it pins packages of its own).

Run: .venv/bin/python bench/aiperf.py [--requests 64] [--concurrency 4] [--image 512] [--isl 64] [--osl 64]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from support.tritonserver import TritonServer  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from goals import verdict  # noqa: E402

AIPERF = "aiperf==0.13.0"
VENV = ROOT / ".venv-aiperf"
TEMPLATE = ('{"text_input": {{ text|tojson }}, "image": {{ images|tojson }}, "max_tokens": {{ max_tokens }}, '
            '"ignore_eos": true, "stream": true}')
METRICS = [("time_to_first_token", "TTFT ms"), ("inter_token_latency", "ITL ms"),
           ("request_latency", "request ms"), ("output_token_throughput", "output tok/s"),
           ("request_throughput", "requests/s")]


def aiperf() -> Path:
    binary = VENV / "bin" / "aiperf"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([VENV / "bin" / "pip", "install", "--disable-pip-version-check", AIPERF], check=True)
    return binary


def profile(binary: Path, out: Path, endpoint: list[str], args) -> dict:
    """One aiperf run; its JSON summary."""
    common = ["--model", "tiny", "--streaming", "--tokenizer", str(ROOT / "checkpoints" / "tiny"),
              "--image-width-mean", str(args.image), "--image-height-mean", str(args.image), "--image-format", "jpeg",
              "--synthetic-input-tokens-mean", str(args.isl), "--output-tokens-mean", str(args.osl),
              "--concurrency", str(args.concurrency), "--request-count", str(args.requests),
              "--warmup-request-count", "4", "--random-seed", "1", "--ui-type", "none", "--artifact-dir", str(out)]
    subprocess.run([binary, "profile", *endpoint, *common], check=True, cwd=out.parent, stdout=subprocess.DEVNULL)
    return json.loads((out / "profile_export_aiperf.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--image", type=int, default=512, help="synthetic image side in pixels")
    ap.add_argument("--isl", type=int, default=64)
    ap.add_argument("--osl", type=int, default=64)
    args = ap.parse_args()
    binary = aiperf()
    work = Path(tempfile.mkdtemp(prefix="epd-aiperf-"))
    (work / "generate_stream.jinja").write_text(TEMPLATE)
    server = TritonServer(work / "server.log", supervised=True)
    try:
        endpoints = {
            "OpenAI server, chat": ["--url", f"http://127.0.0.1:{server.openai}", "--endpoint-type", "chat",
                                  "--use-server-token-count", "--extra-inputs", "ignore_eos:true"],
            "Triton generate_stream": ["--url", f"http://{server.http_url}", "--endpoint-type", "template",
                                       "--custom-endpoint", "/v2/models/language/generate_stream",
                                       "--extra-inputs", "payload_template:generate_stream.jinja",
                                       "--extra-inputs", "response_field:text_output"],
        }
        results = {name: profile(binary, work / name.split()[0], endpoint, args) for name, endpoint in endpoints.items()}
    finally:
        server.stop()
    print(f"aiperf, {args.requests} requests at concurrency {args.concurrency}, one {args.image}x{args.image} "
          f"JPEG + {args.isl} tokens in, {args.osl} out (avg; p99 in brackets)\n")
    print("| endpoint | " + " | ".join(label for _, label in METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for name, r in results.items():
        cells = [f"{r[k]['avg']:.1f}" + (f" ({r[k]['p99']:.1f})" if r[k].get("p99") is not None else "")
                 for k, _ in METRICS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    failed = sum(r.get("error_request_count", {}).get("avg", 0) or 0 for r in results.values())
    print(f"goal: aiperf_failed_requests {failed:g} (target == 0) {verdict(failed, '==', 0)}")


if __name__ == "__main__":
    main()
