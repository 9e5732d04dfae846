"""python -m qwen3vl_epd.checkpoint --tiny DIR: the embedded random-weight checkpoint."""

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the tiny random-weight checkpoint.")
    parser.add_argument("--tiny", metavar="DIR", required=True, help="write the tiny checkpoint here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense", action="store_true", help="the dense Qwen3-VL architecture (default: MoE)")
    args = parser.parse_args()
    from qwen3vl_epd.checkpoint.tiny import build_tiny

    print(build_tiny(args.tiny, seed=args.seed, dense=args.dense))


if __name__ == "__main__":
    main()
