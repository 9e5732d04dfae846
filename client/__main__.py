"""python -m client --prompt "Describe <video>." [--image cat.jpg] [--video clip.mp4] [--stream] [--protocol http]"""

import argparse
import sys
from pathlib import Path

from client import RequestError, generate


def main() -> int:
    parser = argparse.ArgumentParser(description="Send a prompt, images and videos to the Qwen3-VL language model.")
    parser.add_argument("--prompt", required=True,
                        help="the user message; <image> / <video> mark where each image / video goes")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--video", action="append", default=[], help="video file (repeat for several)")
    parser.add_argument("--video-fps", type=float, help="frames per second to sample from each video")
    parser.add_argument("--video-frames", type=int, help="frames to sample from each video in all")
    parser.add_argument("--url", default=None, help="server address (default localhost:8001 gRPC, :8000 HTTP)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens tokens")
    args = parser.parse_args()
    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    images = [Path(p).read_bytes() for p in args.image]
    videos = [Path(p).read_bytes() for p in args.video]
    try:
        last = None
        for last in generate(url, args.prompt, images, args.protocol, args.stream, max_tokens=args.max_tokens,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                             stop=args.stop, ignore_eos=args.ignore_eos or None, videos=videos,
                             video_fps=args.video_fps, video_frames=args.video_frames):
            print(last.text, end="", flush=True)
        print(f"\n[finish_reason={last.finish_reason} input_tokens={last.num_input_tokens} "
              f"output_tokens={last.num_output_tokens}]", file=sys.stderr)
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
