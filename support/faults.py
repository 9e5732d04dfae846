"""Faults the chaos tests inject into a supervised server, and what they watch it by."""

import os
import shutil
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from client import RequestError, generate, text_of
from qwen3vl_epd.ops.launch import MODEL_REPOSITORY
from qwen3vl_epd.ops.stubs import children
from support.prompts import image_bytes


def tritonserver_pid(server) -> int:
    """The supervisor's tritonserver child (its other child is the OpenAI server)."""
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == server.process.pid
                    and (proc / "cmdline").read_bytes().split(b"\0")[0].endswith(b"tritonserver")):
                return int(proc.name)
        except (OSError, IndexError, ValueError):
            pass
    raise AssertionError("no tritonserver under the supervisor")


def stub_pid(server, model: str) -> int:
    """The pid of the model process serving `model` under the supervised server."""
    for pid, stub in children(tritonserver_pid(server)).items():
        if stub.model == model:
            return pid
    raise AssertionError(f"no stub for {model}")


def back(server, since: float) -> float:
    """Seconds from `since` until an image request is served again."""
    while time.monotonic() - since < 300:
        try:
            text, last = text_of(generate(server.grpc_url, "Hi", [image_bytes("small_64x64.webp")], max_tokens=2,
                                          timeout=10))
            if last.num_output_tokens == 2:
                return time.monotonic() - since
        except (RequestError, OSError, Exception):
            time.sleep(0.5)
    raise AssertionError("the service did not come back")


def not_ready_after(server, since: float, bound: float = 15.0) -> float:
    """Seconds from `since` until /v2/health/ready stops answering 200 (refused, or another status)."""
    while time.monotonic() - since < bound:
        try:
            with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=0.5) as r:
                if r.status != 200:
                    break
        except OSError:
            break
        time.sleep(0.02)
    return time.monotonic() - since


def pools_empty(server, timeout=10.0):
    time.sleep(0.2)  # gauges are reported every 0.1 s: none is read stale
    deadline = time.monotonic() + timeout
    while any((values := server.metric_values("epd_buffer_blocks_in_use")).values()) or not values:
        assert time.monotonic() < deadline, values
        time.sleep(0.1)


def restarts(server) -> int:
    return sum(line.startswith("supervisor: restarting tritonserver") for line in server.log_path.open())


def patched_repository(where: Path, prelude: str) -> Path:
    """model_repository/ with `prelude` run before the language model's model.py (the other models
    linked as they are): how a test puts a fault inside a real model process."""
    where.mkdir()
    for model in MODEL_REPOSITORY.iterdir():
        if model.name != "language":
            (where / model.name).symlink_to(model)
    (where / "language" / "1").mkdir(parents=True)
    shutil.copy(MODEL_REPOSITORY / "language" / "config.pbtxt", where / "language")
    source = (MODEL_REPOSITORY / "language" / "1" / "model.py").read_text()
    (where / "language" / "1" / "model.py").write_text(prelude + source)
    return where


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def soak(server, request, n: int, concurrency: int, kill_at: int, warm_at: int, stub=stub_pid,
         model: str = "language"):
    """n requests (`request(i)`: text and images) at `concurrency`, the model process of `model`
    SIGKILLed after request `kill_at`, resident memory of both model processes after request
    `warm_at` (warmed up, after the kill) and at the end. Clients retry UNAVAILABLE for up to 90 s,
    as a client would. (outcomes, requests that needed a retry, {request number: {model: KiB}})."""
    done, rss = threading.Semaphore(0), {}
    marks = (warm_at, n)

    def one(i):
        text, images = request(i)
        deadline, tries = time.monotonic() + 90, 0
        while True:
            tries += 1
            try:
                last = text_of(generate(server.grpc_url, text, images, stream=bool(i % 2), max_tokens=4, timeout=120))[1]
                outcome = "ok" if last.num_output_tokens >= 1 else "empty"
                break
            except RequestError as e:
                outcome = f"{e.code}: {e.message}"
                if e.code != "UNAVAILABLE" or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        done.release()
        return outcome, tries

    def watch():
        for k in range(1, n + 1):
            done.acquire()
            if k == kill_at:
                os.kill(stub(server, model), signal.SIGKILL)
            if k in marks:
                rss[k] = {m: rss_kib(stub(server, m)) for m in ("language", "encoder")}

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    watcher.join(60)
    return [o for o, _ in results], sum(1 for _, tries in results if tries > 1), rss


def assert_soaked(label: str, n: int, warm_at: int, outcomes: list[str], retried: int, rss: dict) -> None:
    """Every one of n requests served (the kill felt: some retried), memory flat after warm-up."""
    print(f"{label}: {outcomes.count('ok')} of {n} served, {retried} after UNAVAILABLE retries; "
          f"RSS KiB at {warm_at} {rss.get(warm_at)}, at {n} {rss.get(n)}")
    assert outcomes == ["ok"] * n, {o: outcomes.count(o) for o in set(outcomes)}
    assert retried > 0  # the kill was felt
    for model in ("language", "encoder"):
        assert rss[n][model] <= rss[warm_at][model] * 1.1 + 20_000, (model, rss)


def freezer_root() -> Path | None:
    """A cgroup freezer hierarchy this process may write (v1 `freezer`, else v2), or None."""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, where, kind, options = line.split()[:4]
        if (kind == "cgroup" and "freezer" in options.split(",") or kind == "cgroup2") and os.access(where, os.W_OK):
            return Path(where)
    return None


FREEZER = freezer_root()
FROZEN = FREEZER / f"epd-chaos-{os.getpid()}" if FREEZER else None
NO_FREEZER = "HANG CHAOS TESTS SKIPPED: no writable cgroup freezer (needs root); hangs only the heartbeat shows were not injected"


def freeze(pid: int) -> None:
    """A hang that the process state does not show: the whole process (every thread: cgroup.procs,
    in v1 as in v2) frozen by the cgroup freezer (state D; not even SIGKILL ends it until thawed).
    Only its heartbeat shows it; one wedged thread is tests/test_busy.py's wedged engine."""
    FROZEN.mkdir(exist_ok=True)
    v1 = (FROZEN / "freezer.state").exists()
    (FROZEN / "cgroup.procs").write_text(str(pid))
    (FROZEN / ("freezer.state" if v1 else "cgroup.freeze")).write_text("FROZEN" if v1 else "1")


def thaw() -> None:
    """Thaw and remove the test's cgroup (the supervisor's SIGKILL then ends the frozen process)."""
    if FROZEN is None or not FROZEN.exists():
        return
    v1 = (FROZEN / "freezer.state").exists()
    (FROZEN / ("freezer.state" if v1 else "cgroup.freeze")).write_text("THAWED" if v1 else "0")
    deadline = time.monotonic() + 10
    while (FROZEN / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    FROZEN.rmdir()
