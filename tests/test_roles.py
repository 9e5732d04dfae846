"""Multi-host roles without servers: role settings, the encoder allow-list, the advertised address,
and the encoder pool's bounded wait when no encoder is reachable."""

import ipaddress
import threading
import time

import pytest
import torch

from qwen3vl_epd.errors import UnavailableError
from qwen3vl_epd.language.encoder_pool import EncoderPool
from qwen3vl_epd.language.engine.attention import choose_backend
from qwen3vl_epd.ops.launch import MODEL_REPOSITORY, command, device_repository, role_env, target_hosts
from qwen3vl_epd.settings import LanguageSettings, pbtxt_parameters
from qwen3vl_epd.transfer.peers import HostAllowList
from qwen3vl_epd.transfer.transport import advertised_host
from support.tritonserver import free_ports

pytestmark = pytest.mark.unit
KEYED = {"EPD_HANDLE_KEY": "ab" * 32}


def test_target_hosts():
    assert target_hosts("ipv4:10.0.1.2:8001,10.0.2.2:8001") == ["10.0.1.2", "10.0.2.2"]
    assert target_hosts("ipv6:[fd00::2]:8001") == ["fd00::2"]
    assert target_hosts("enc1:8001") == ["enc1"]
    assert target_hosts("dns:///encoders.example:8001") == []


def test_role_settings():
    assert role_env("all", 9001, {}) == {"EPD_ENCODERS": "127.0.0.1:9001"}
    assert role_env("all", 9001, {"EPD_ENCODERS": "x:1"}) == {}  # the environment wins
    with pytest.raises(SystemExit, match="must share a handle key"):
        role_env("encoder", 8001, {})
    assert role_env("encoder", 8001, KEYED) == {"EPD_MOONCAKE_HOST": "auto"}
    with pytest.raises(SystemExit, match="needs the encoder pool"):
        role_env("language", 8001, KEYED)
    got = role_env("language", 8001, {**KEYED, "EPD_ENCODERS": "ipv4:10.0.1.2:8001,10.0.2.2:8001"})
    assert got == {"EPD_MOONCAKE_HOST": "auto", "EPD_ALLOWED_ENCODER_HOSTS": "10.0.1.2,10.0.2.2"}
    with pytest.raises(SystemExit, match="--allowed-encoder-hosts"):
        role_env("language", 8001, {**KEYED, "EPD_ENCODERS": "dns:///enc:8001"})


def test_roles_load_only_their_models(monkeypatch):
    monkeypatch.setenv("EPD_HANDLE_KEY", "ab" * 32)
    argv, _ = command(role="encoder")
    assert "--model-control-mode=explicit" in argv and "--load-model=encoder" in argv
    assert not any(a.startswith("--load-model=") and a != "--load-model=encoder" for a in argv)
    monkeypatch.setenv("EPD_ENCODERS", "ipv4:10.0.1.2:8001")
    argv, env = command(role="language")
    assert {"--load-model=language", "--load-model=ensemble", "--load-model=complete"} <= set(argv)
    assert "--load-model=encoder" not in argv and env["EPD_ALLOWED_ENCODER_HOSTS"] == "10.0.1.2"
    argv, env = command(grpc_port=9001)  # all: every model, the encoder reached through this server
    assert not any(a.startswith("--load-model") for a in argv)


def test_gpu_configuration_is_generated_not_edited(tmp_path):
    """--device cuda:N: encoder and language become KIND_GPU instances on GPU N with device cuda:N
    and the language model's KV blocks the paged flash attention's 256 tokens, in a generated repository whose model.py files are the repository's own; nothing is edited."""
    before = {p: p.read_text() for p in MODEL_REPOSITORY.glob("*/config.pbtxt")}
    repo = device_repository("cuda:1", tmp_path)
    for model in ("encoder", "language"):
        config = (repo / model / "config.pbtxt").read_text()
        assert "instance_group [ { count: 1 kind: KIND_GPU gpus: [ 1 ] } ]" in config and "KIND_CPU" not in config
        assert 'key: "device" value: { string_value: "cuda:1" }' in config and '"cpu"' not in config
        assert (repo / model / "1" / "model.py").resolve() == (MODEL_REPOSITORY / model / "1" / "model.py").resolve()
    language = LanguageSettings.from_parameters(pbtxt_parameters(repo / "language" / "config.pbtxt"), env={})
    assert language.kv_block_size == 256 and choose_backend(language.attention_backend, torch.device("cuda:1"),
                                                            torch.bfloat16, 256, 128) == "flash"
    assert "preferred_batch_size: [ 1 ]" in before[MODEL_REPOSITORY / "encoder" / "config.pbtxt"]
    assert "preferred_batch_size" not in (repo / "encoder" / "config.pbtxt").read_text()  # a GPU batches
    assert (repo / "complete" / "config.pbtxt").read_text() == before[MODEL_REPOSITORY / "complete" / "config.pbtxt"]
    assert (repo / "ensemble" / "config.pbtxt").exists()
    argv, _ = command(work_dir=tmp_path, device="cuda:1")
    assert f"--model-repository={repo}" in argv
    assert device_repository("cpu", tmp_path) == MODEL_REPOSITORY
    assert command(work_dir=tmp_path)[0].count(f"--model-repository={MODEL_REPOSITORY}") == 1
    with pytest.raises(SystemExit, match="not cpu, cuda or cuda:N"):
        device_repository("gpu0", tmp_path)
    assert {p: p.read_text() for p in MODEL_REPOSITORY.glob("*/config.pbtxt")} == before


def test_allow_list_names_and_networks():
    allowed = HostAllowList({"10.0.1.0/24", "enc.example", "fd00::/64"})
    assert "10.0.1.7" in allowed and "enc.example" in allowed and "[fd00::2]" in allowed
    assert "10.0.2.7" not in allowed and "enc2.example" not in allowed and "127.0.0.1" not in allowed
    assert "10.9.9.9" in HostAllowList({"*"})


def test_advertised_host():
    assert advertised_host("10.0.1.2") == "10.0.1.2"
    try:
        auto = advertised_host("auto")
    except ValueError as e:  # a machine without a default route says what to set
        assert "set mooncake_host" in str(e)
    else:
        assert not ipaddress.ip_address(auto).is_loopback


def test_no_reachable_encoder_is_unavailable_within_the_bound():
    port = free_ports(1)[0]  # nothing listens there
    pool = EncoderPool(f"ipv4:127.0.0.1:{port}", wait_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(UnavailableError, match=f"no encoder of the pool 'ipv4:127.0.0.1:{port}' is reachable"):
        pool.encode("Describe.", [b"\xff\xd8"])
    assert time.monotonic() - t0 < 3
    pool.close()


def test_a_prompt_whose_encoder_died_before_its_first_token_is_encoded_again():
    """LanguageService's rule alone, with the pool and engine stood in by their call records: a lost
    pull (PeerError, HandleExpiredError) before any token re-encodes, up to ENCODE_ATTEMPTS."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from qwen3vl_epd.errors import InvalidInputError, PeerError
    from qwen3vl_epd.language.request import ENCODE_ATTEMPTS, LanguageRequest, Piece, PromptInputs
    from qwen3vl_epd.language.service import LanguageService
    from qwen3vl_epd.liveness import Progress

    def run(outcomes):
        """outcomes: what each pull ends with; returns (encodes, pieces the client saw)."""
        encodes, seen, told = [], [], threading.Event()
        outcomes = iter(outcomes)
        service = object.__new__(LanguageService)  # only the request's path, none of the model
        service.encoding, service._lock = 0, threading.Lock()
        service.encoders = SimpleNamespace(encode=lambda *a, **k: encodes.append(a) or b"handle",
                                           count_retry=lambda: None)
        service.engine = SimpleNamespace(submit=lambda handle, request: service._deliver(request, next(outcomes)),
                                         idle=lambda: True, progress=Progress())
        with ThreadPoolExecutor(1) as workers:
            service.encode_workers = workers
            request = LanguageRequest(None, lambda piece: seen.append(piece) or told.set(),
                                      inputs=PromptInputs("x", [b"img"]))
            service._encode_later(request)
            assert told.wait(10)
        return len(encodes), seen

    lost, done = Piece("", None, 0, 0, PeerError("encoder peer gone")), Piece("ok", "stop", 3, 1)
    assert run([lost, done]) == (2, [done])
    n, seen = run([lost] * ENCODE_ATTEMPTS)
    assert n == ENCODE_ATTEMPTS and seen == [lost]  # then the client is told
    bad = Piece("", None, 0, 0, InvalidInputError("image 0: cannot decode image"))
    assert run([bad]) == (1, [bad])
    late = Piece("", None, 0, 2, PeerError("encoder peer gone"))  # tokens were already sent: no retry
    assert run([late]) == (1, [late])


def test_console_shows_what_matters():
    from qwen3vl_epd.ops.console import Console

    quiet, verbose = Console(), Console(verbose=True)
    lines = {
        'I1129 01:57:50.1 9853 model_lifecycle.cc:838] "successfully loaded \'encoder\'"': "loaded model encoder",
        "I1129 01:57:50.1 9853 transfer_engine_impl.cpp:116] Transfer Engine parseHostNameWithPort": None,
        'E1129 01:08:56.5 12164 server.cc:241] "CudaDriverHelper has not been initialized."': None,
        "Error: Failed to initialize NVML": None,
        "E1129 01:09:09.8 12199 transfer_metadata.cpp:1098] Local segment descriptor not found": None,
        "| encoder  | 1       | READY  |": None,
        "E1129 01:10:31.6 12632 tcp_transport_session_impl.h:631] ClientSession: failed to read": "keep",
        "supervisor: restarting tritonserver": "keep",
        'I1201 10:21:55.1 20400 adapter.py:27] "qwen3vl_epd.language.service: language model ready: checkpoint x"':
            "qwen3vl_epd.language.service: language model ready: checkpoint x",
    }
    for line, want in lines.items():
        assert quiet.filter(line) == (line if want == "keep" else want), line
        assert verbose.filter(line) == line
