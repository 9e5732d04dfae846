"""python -m qwen3vl_epd.openai_api [--port 9000] [--triton 127.0.0.1:8001] [--served-model-name NAME]

scripts/serve starts it beside tritonserver (roles all and language); run it by hand in front of
any server of this repository."""

import argparse
import os

from qwen3vl_epd.openai_api.server import ServerConfig, serve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=int(os.environ.get("OPENAI_PORT", 9000)))
    p.add_argument("--triton", default="127.0.0.1:8001", help="tritonserver's gRPC address")
    p.add_argument("--served-model-name", default="qwen3-vl", help="the `model` clients name")
    p.add_argument("--api-key", default=os.environ.get("EPD_OPENAI_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: EPD_OPENAI_API_KEY, else none)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (off: only data: URLs are accepted)")
    a = p.parse_args()
    serve(ServerConfig(a.triton, a.served_model_name, api_key=a.api_key, allow_remote_images=a.allow_remote_images),
          a.host, a.port)


if __name__ == "__main__":
    main()
