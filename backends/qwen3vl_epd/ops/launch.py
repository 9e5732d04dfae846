"""Starts tritonserver on the model repository: the system one (NGC container) or nvidia-pytriton's.

python -m qwen3vl_epd.ops.launch [--role all|encoder|language] [--encoders TARGET] [--http-port 8000] ...

Roles: `all` serves every model (the language model reaches the encoder through this server's own
gRPC port); `encoder` only the encoder; `language` the language model and the client-facing models,
encoding on the pool TARGET (a gRPC target: "ipv4:10.0.1.2:8001,10.0.2.2:8001", "dns:///enc:8001").
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from qwen3vl_epd.liveness import Bounds
from qwen3vl_epd.ops.console import Console, cpu_only_flags, has_gpu
from qwen3vl_epd.ops.supervisor import Probe, Supervisor
from qwen3vl_epd.settings import DEFAULT_CHECKPOINT, REPO_ROOT
from qwen3vl_epd.transfer.signing import ENV_KEY, ENV_KEY_FILE, new_key

MODEL_REPOSITORY = REPO_ROOT / "model_repository"
ROLE_MODELS = {"all": [], "encoder": ["encoder"], "language": ["language", "ensemble", "complete"]}
ALL_MODELS = ["language", "ensemble", "complete", "encoder"]
PROBED = {"all": ["language", "encoder"], "encoder": ["encoder"], "language": ["language"]}


def pytriton_backend_dir(work_dir: Path) -> tuple[Path, Path]:
    """(tritonserver binary, backend directory) from nvidia-pytriton (../shared/DESIGN.md: installing Triton)."""
    import pytriton

    base = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = base / "python_backend_stubs" / version / "triton_python_backend_stub"
    python_dir = work_dir / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _link(base / "backends" / "python" / name, python_dir / name)
    # A symlink, not a copy: the stub finds its bundled libraries relative to its real path.
    _link(stub, python_dir / "triton_python_backend_stub")
    return base / "bin" / "tritonserver", work_dir / "backends"


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    link.unlink(missing_ok=True)
    link.symlink_to(target)


CPU_INSTANCES = "instance_group [ { count: 1 kind: KIND_CPU } ]"
CPU_DEVICE = 'parameters { key: "device" value: { string_value: "cpu" } }'
CPU_KV_BLOCK = 'parameters { key: "kv_block_size" value: { string_value: "16" } }'
CUDA_KV_BLOCK = 'parameters { key: "kv_block_size" value: { string_value: "256" } }'  # FlashAttention-2's paged unit
CPU_ENCODER_BATCH = "  preferred_batch_size: [ 1 ]\n"


def device_repository(device: str, work_dir: Path, source: Path = MODEL_REPOSITORY) -> Path:
    """The model repository for `device`: the source itself for cpu; for cuda[:N] a generated one
    under work_dir whose encoder and language run as KIND_GPU instances on GPU N with device
    cuda:N, KV blocks of 256 tokens for the paged flash attention and encoder batches of any size up
    to max_batch_size (config.pbtxt rewritten, version directories linked: the same model.py files)."""
    if device == "cpu":
        return source
    if not (device == "cuda" or device.startswith("cuda:") and device[5:].isdigit()):
        raise SystemExit(f"--device: {device!r} is not cpu, cuda or cuda:N")
    gpu = int(device[5:] or 0) if ":" in device else 0
    out = work_dir / f"repository-cuda{gpu}"
    for model in sorted(d for d in source.iterdir() if (d / "config.pbtxt").exists()):
        target = out / model.name
        target.mkdir(parents=True, exist_ok=True)
        config = (model / "config.pbtxt").read_text()
        if CPU_DEVICE in config:  # the models that run torch
            config = config.replace(CPU_INSTANCES, f"instance_group [ {{ count: 1 kind: KIND_GPU gpus: [ {gpu} ] }} ]")
            config = config.replace(CPU_DEVICE, f'parameters {{ key: "device" value: {{ string_value: "cuda:{gpu}" }} }}')
            config = config.replace(CPU_KV_BLOCK, CUDA_KV_BLOCK).replace(CPU_ENCODER_BATCH, "")
        (target / "config.pbtxt").write_text(config)
        for version in (d for d in model.iterdir() if d.is_dir() and d.name.isdigit()):
            _link(version.resolve(), target / version.name)
    return out


def target_hosts(target: str) -> list[str]:
    """The hosts of a gRPC target that lists addresses ("ipv4:a:p,b:p", "a:p"); [] for a DNS name."""
    if target.startswith("dns:"):
        return []
    body = target.split(":", 1)[1] if target.startswith(("ipv4:", "ipv6:")) else target
    return [a.rsplit(":", 1)[0].strip("[]") for a in body.split(",") if a]


def role_env(role: str, grpc_port: int, env: dict) -> dict:
    """The EPD_* settings of a role (what the environment already sets wins)."""
    out = {}
    if role == "all":
        out["EPD_ENCODERS"] = f"127.0.0.1:{grpc_port}"
        return {k: v for k, v in out.items() if not env.get(k)}
    if not (env.get(ENV_KEY) or env.get(ENV_KEY_FILE)):
        raise SystemExit(f"--role {role}: encoders and language servers must share a handle key: set "
                         f"{ENV_KEY_FILE} (a file with the key, README 'Security') or {ENV_KEY}")
    out["EPD_MOONCAKE_HOST"] = "auto"  # peers on other hosts must reach it: never 127.0.0.1
    if role == "language":
        if not env.get("EPD_ENCODERS"):
            raise SystemExit("--role language needs the encoder pool: --encoders TARGET (or EPD_ENCODERS)")
        hosts = target_hosts(env["EPD_ENCODERS"])
        if not hosts and not env.get("EPD_ALLOWED_ENCODER_HOSTS"):
            raise SystemExit("--encoders names a DNS target: list the encoder hosts or their network with "
                             "--allowed-encoder-hosts (or EPD_ALLOWED_ENCODER_HOSTS), e.g. 10.0.0.0/16")
        out["EPD_ALLOWED_ENCODER_HOSTS"] = ",".join(hosts)
    return {k: v for k, v in out.items() if not env.get(k)}


def command(http_port=8000, grpc_port=8001, metrics_port=8002, model_repository=MODEL_REPOSITORY,
            work_dir: Path | None = None, extra: list[str] = (), role: str = "all",
            log_info: bool = False, verbose: bool = False, device: str = "cpu") -> tuple[list[str], dict]:
    """The tritonserver argv and environment. `log_info`: its info lines (the supervisor's console
    filters them); `verbose`: everything, Mooncake's info lines too."""
    work_dir = work_dir or REPO_ROOT / ".triton"
    model_repository = device_repository(device, work_dir, model_repository)
    env = dict(os.environ)
    env.update(role_env(role, grpc_port, env))
    if not verbose:
        env.setdefault("GLOG_minloglevel", "1")  # Mooncake at warning level
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")  # the stub must find the venv's packages
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "backends"), env.get("PYTHONPATH")]))
    if not (env.get(ENV_KEY) or env.get(ENV_KEY_FILE)):
        env[ENV_KEY] = new_key()  # this server's handle key, shared by its model processes
    argv = [
        f"--model-repository={model_repository}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}", "--allow-metrics=true", f"--log-info={str(log_info or verbose).lower()}",
        "--exit-timeout-secs=20",  # its own graceful stop, within the supervisor's bound
        # Our configs are complete: without this the Python backend starts every model's process
        # twice (once to ask model.py for a config), doubling the imports of every (re)start.
        "--disable-auto-complete-config",
        *([] if has_gpu() else cpu_only_flags()), *extra,
    ]
    if ROLE_MODELS[role]:
        argv += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in ROLE_MODELS[role])]
    system = shutil.which("tritonserver", path="/opt/tritonserver/bin" + os.pathsep + env["PATH"])
    if system and "pytriton" not in system:
        return [system, *argv], env
    binary, backends = pytriton_backend_dir(work_dir)
    # The venv interpreter's own libpython first: Debian's system one breaks the venv's stdlib in the stub.
    libdir = sysconfig.get_config_var("LIBDIR")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    return [str(binary), f"--backend-directory={backends}", *argv], env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("HTTP_PORT", 8000)))
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", 8001)))
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("METRICS_PORT", 8002)))
    parser.add_argument("--role", choices=sorted(ROLE_MODELS), default=os.environ.get("EPD_ROLE", "all"))
    parser.add_argument("--encoders", help="language role: the encoder pool's gRPC target (EPD_ENCODERS)")
    parser.add_argument("--allowed-encoder-hosts", help="hosts or CIDR handles may point at (default: "
                        "the addresses in --encoders)")
    parser.add_argument("--mooncake-host", help="the address other hosts reach this one's Mooncake at "
                        "(multi-host roles: default auto, the default route's address)")
    parser.add_argument("--probe-interval-s", type=float, default=float(os.environ.get("EPD_PROBE_INTERVAL_S", 1)),
                        help="supervise: probe every model this often and restart tritonserver when one stops "
                        "serving or it crashes (0: no supervisor, tritonserver replaces this process)")
    parser.add_argument("--probe-timeout-s", type=float, default=float(os.environ.get("EPD_PROBE_TIMEOUT_S", 3)),
                        help="a probe not answered within this fails; two in a row restart tritonserver "
                        "(EPD_PROBE_TIMEOUT_S)")
    parser.add_argument("--heartbeat-timeout-s", type=float,
                        default=float(os.environ.get("EPD_HEARTBEAT_TIMEOUT_S", Bounds.heartbeat_s)),
                        help="a model process whose heartbeat is older than this is hung (frozen)")
    parser.add_argument("--hang-ceiling-s", type=float, default=float(os.environ.get("EPD_HANG_CEILING_S", Bounds.ceiling_s)),
                        help="the longest a model process holding work may go without progress, whatever its "
                        "recent batch times (docs/design.md, liveness)")
    parser.add_argument("--device", default=os.environ.get("EPD_DEVICE", "cpu"),
                        help="cpu, or cuda[:N]: encoder and language as GPU instances on GPU N (EPD_DEVICE)")
    parser.add_argument("--openai-port", type=int, default=int(os.environ.get("OPENAI_PORT", 9000)),
                        help="the OpenAI-compatible server's port, roles all and language (0: none)")
    parser.add_argument("--served-model-name", help="the OpenAI server's model name (default: the checkpoint's "
                        "directory name)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="the OpenAI server fetches http(s) image URLs (default: data: URLs only)")
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY,
                        help="serve this model repository (default: the repository's model_repository/)")
    parser.add_argument("--verbose", action="store_true", help="show all of tritonserver's and Mooncake's output")
    args, extra = parser.parse_known_args()
    for name in ("encoders", "allowed_encoder_hosts", "mooncake_host"):
        if getattr(args, name):
            os.environ["EPD_" + name.upper()] = getattr(args, name)
    argv, env = command(args.http_port, args.grpc_port, args.metrics_port, args.model_repository, extra=extra,
                        role=args.role,
                        log_info=args.probe_interval_s > 0, verbose=args.verbose, device=args.device)
    print(f"serving {args.model_repository} on {args.device} as role {args.role} ({', '.join(ROLE_MODELS[args.role]) or 'every model'}): "
          f"HTTP localhost:{args.http_port}, gRPC localhost:{args.grpc_port}, "
          f"metrics http://localhost:{args.metrics_port}/metrics\n"
          f"try: .venv/bin/python -m client --prompt 'Describe this image.' --image IMAGE --stream "
          f"--url localhost:{args.grpc_port}", flush=True)
    if args.probe_interval_s <= 0:
        os.execve(argv[0], argv, env)
    probe = Probe(f"127.0.0.1:{args.grpc_port}", PROBED[args.role], args.probe_timeout_s)
    openai = openai_server(args) if args.role != "encoder" and args.openai_port > 0 else None
    ready = (f"ready: HTTP http://localhost:{args.http_port}, gRPC localhost:{args.grpc_port}, metrics "
             f"http://localhost:{args.metrics_port}/metrics, models {', '.join(ROLE_MODELS[args.role] or ALL_MODELS)}"
             + (f", OpenAI http://localhost:{args.openai_port}/v1" if openai else ""))
    sys.exit(Supervisor(argv, env, probe, interval_s=args.probe_interval_s, ready_message=ready,
                        console=Console(args.verbose), companions=[openai] if openai else [],
                        bounds=Bounds(heartbeat_s=args.heartbeat_timeout_s, ceiling_s=args.hang_ceiling_s)).run())


def openai_server(args) -> list[str]:
    """The argv of the OpenAI-compatible server in front of this server's gRPC port."""
    name = args.served_model_name or Path(os.environ.get("EPD_CHECKPOINT") or DEFAULT_CHECKPOINT).name
    return [sys.executable, "-m", "qwen3vl_epd.openai_api", "--port", str(args.openai_port),
            "--triton", f"127.0.0.1:{args.grpc_port}", "--served-model-name", name,
            *(["--allow-remote-images"] if args.allow_remote_images else [])]


if __name__ == "__main__":
    main()
