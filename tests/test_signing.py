"""Handle keys: signing, rotation with a grace period, key files, and the per-server generated key."""

import os
import subprocess
import sys
import time

import pytest

from qwen3vl_epd.ops import launch
from qwen3vl_epd.transfer import signing
from qwen3vl_epd.transfer.signing import ENV_KEY, ENV_KEY_FILE, HandleKeys, new_key, server_key

pytestmark = pytest.mark.unit

A, B = "a1" * 32, "b2" * 32
MESSAGE = b'{"slot":1}'


def test_sign_and_verify():
    keys = HandleKeys(A)
    signature = keys.sign(MESSAGE)
    assert keys.verify(MESSAGE, signature)
    assert not keys.verify(MESSAGE + b" ", signature)
    assert not HandleKeys(B).verify(MESSAGE, signature)
    assert not keys.verify(MESSAGE, "")


def test_previous_key_accepted_until_its_grace_ends():
    old = HandleKeys(A).sign(MESSAGE)
    assert HandleKeys(f"{B},{A}@{time.time() + 60}").verify(MESSAGE, old)
    assert not HandleKeys(f"{B},{A}@{time.time() - 1}").verify(MESSAGE, old)
    assert HandleKeys(f"{B}\n{A}@{time.time() + 60}").sign(MESSAGE) == HandleKeys(B).sign(MESSAGE)  # signs with B


@pytest.mark.parametrize("text,message", [
    ("", "no handle key"),
    ("abcd", "2 bytes, under the minimum of 16"),
    ("zz" * 32, "entry 0 is not HEX"),
    (f"{A}@123", "the first (current) key has no end of grace"),
    (f"{A},{B}@soon", "entry 1 is not HEX"),
])
def test_malformed_keys_name_the_source(text, message):
    with pytest.raises(ValueError, match="EPD_HANDLE_KEY: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        HandleKeys(text, ENV_KEY)


def test_key_file_is_read_again_when_it_changes(tmp_path):
    path = tmp_path / "handle.key"
    path.write_text(A + "\n")
    keys = HandleKeys.from_file(path)
    old = keys.sign(MESSAGE)
    time.sleep(1.1)  # changes are looked for at most once a second
    path.write_text(f"{B}\n{A}@{time.time() + 60}\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1))
    assert keys.sign(MESSAGE) == HandleKeys(B).sign(MESSAGE)
    assert keys.verify(MESSAGE, old)  # handles in flight during the rotation still pass


def test_sources_in_order(tmp_path):
    setting, env_file = tmp_path / "setting.key", tmp_path / "env.key"
    setting.write_text(A)
    env_file.write_text(B)
    env = {ENV_KEY_FILE: str(env_file), ENV_KEY: new_key()}
    assert HandleKeys.load(str(setting), env).current == bytes.fromhex(A)
    assert HandleKeys.load("", env).current == bytes.fromhex(B)
    assert HandleKeys.load("", {ENV_KEY: A}).current == bytes.fromhex(A)


def test_the_model_processes_of_one_server_share_its_generated_key(tmp_path):
    """Two children of one process (as tritonserver's model stubs are) find the same key; another
    parent gets another one."""
    # signing.py alone (standard library only), without importing the package and torch
    code = ("import importlib.util as u; s = u.spec_from_file_location('signing', %r); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); print(m.HandleKeys.load('', {}).current.hex())" % signing.__file__)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop(ENV_KEY, None), env.pop(ENV_KEY_FILE, None)
    run = lambda: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,  # noqa: E731
                                 check=True).stdout.strip()
    first, second = run(), run()
    assert first == second and len(first) == 64
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("epd-handle-key-")]
    assert path.stat().st_mode & 0o777 == 0o600
    shell = subprocess.run(["sh", "-c", '"$0" -c "$1"; true', sys.executable, code], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert shell != first  # a child of another process: another server


def test_a_key_file_others_can_read_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    path = server_key()
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="not a private key file"):
        server_key()


def test_launch_gives_each_server_a_key(monkeypatch):
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    _, env = launch.command()
    _, again = launch.command()
    assert len(env[ENV_KEY]) == 64 and env[ENV_KEY] != again[ENV_KEY]
    monkeypatch.setenv(ENV_KEY, A)
    assert launch.command()[1][ENV_KEY] == A
