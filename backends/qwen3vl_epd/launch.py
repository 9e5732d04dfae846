"""Starts tritonserver on the model repository: the system one (NGC container) or nvidia-pytriton's.

python -m qwen3vl_epd.launch [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from .settings import REPO_ROOT
from .transfer.signing import ENV_KEY, ENV_KEY_FILE, new_key

MODEL_REPOSITORY = REPO_ROOT / "model_repository"


def pytriton_backend_dir(work_dir: Path) -> tuple[Path, Path]:
    """(tritonserver binary, backend directory) from nvidia-pytriton, per DESIGN §7."""
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


def command(http_port=8000, grpc_port=8001, metrics_port=8002, model_repository=MODEL_REPOSITORY,
            work_dir: Path | None = None, extra: list[str] = ()) -> tuple[list[str], dict]:
    """The tritonserver argv and environment."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")  # the stub must find the venv's packages
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "backends"), env.get("PYTHONPATH")]))
    if not (env.get(ENV_KEY) or env.get(ENV_KEY_FILE)):
        env[ENV_KEY] = new_key()  # this server's handle key, shared by its model processes
    argv = [
        f"--model-repository={model_repository}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}", "--allow-metrics=true", "--log-info=false", *extra,
    ]
    system = shutil.which("tritonserver", path="/opt/tritonserver/bin" + os.pathsep + env["PATH"])
    if system and "pytriton" not in system:
        return [system, *argv], env
    binary, backends = pytriton_backend_dir(work_dir or REPO_ROOT / ".triton")
    # The venv interpreter's own libpython first: Debian's system one breaks the venv's stdlib in the stub.
    libdir = sysconfig.get_config_var("LIBDIR")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    return [str(binary), f"--backend-directory={backends}", *argv], env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("HTTP_PORT", 8000)))
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", 8001)))
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("METRICS_PORT", 8002)))
    args, extra = parser.parse_known_args()
    argv, env = command(args.http_port, args.grpc_port, args.metrics_port, extra=extra)
    print(f"serving {MODEL_REPOSITORY}: HTTP localhost:{args.http_port}, gRPC localhost:{args.grpc_port}, "
          f"metrics http://localhost:{args.metrics_port}/metrics\n"
          f"try: .venv/bin/python -m client --prompt 'Describe this image.' --image IMAGE --stream "
          f"--url localhost:{args.grpc_port}", flush=True)
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    main()
