"""config.pbtxt parameters → Settings."""

import json
from pathlib import Path

import pytest
import torch

from qwen3vl_epd.settings import DEFAULT_CHECKPOINT, Settings, pbtxt_parameters

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1] / "model_repository"


@pytest.mark.parametrize("model", ["encoder", "language"])
def test_shipped_configs_parse(model):
    params = pbtxt_parameters(REPO / model / "config.pbtxt")
    assert "checkpoint" in params and "max_model_len" in params
    s = Settings.from_parameters({k: {"string_value": v} for k, v in params.items()}, env={})
    assert s.checkpoint_dir == str(DEFAULT_CHECKPOINT) and s.mooncake_protocol == "tcp"


def test_types_env_override_and_unknown_keys():
    s = Settings.from_parameters({"chunk_tokens": "128", "handle_ttl_s": "2.5", "allowed_encoder_hosts": "a, b",
                                  "dtype": "bfloat16"}, env={"EPD_CHECKPOINT": "/models/x"})
    assert (s.chunk_tokens, s.handle_ttl_s, s.allowed_encoder_hosts) == (128, 2.5, ["a", "b"])
    assert s.checkpoint_dir == "/models/x" and s.torch_dtype(None) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown parameter 'chunk_size'"):
        Settings.from_parameters({"chunk_size": "1"}, env={})
    with pytest.raises(ValueError, match="'chunk_tokens': 'many' is not a valid int"):
        Settings.from_parameters({"chunk_tokens": "many"}, env={})
    json.dumps(Settings().__dict__)  # plain values only


def test_every_setting_has_an_environment_override():
    s = Settings.from_parameters({"encoders": "127.0.0.1:8001", "encoder_wait_s": "10"},
                                 env={"EPD_ENCODERS": "ipv4:10.0.1.2:8001,10.0.2.2:8001", "EPD_ENCODER_WAIT_S": "2.5",
                                      "EPD_ALLOWED_ENCODER_HOSTS": "10.0.0.0/16, enc.example"})
    assert s.encoders == "ipv4:10.0.1.2:8001,10.0.2.2:8001" and s.encoder_wait_s == 2.5
    assert s.allowed_encoder_hosts == ["10.0.0.0/16", "enc.example"]
    with pytest.raises(ValueError, match="'EPD_CHUNK_TOKENS': 'x' is not a valid int"):
        Settings.from_parameters({}, env={"EPD_CHUNK_TOKENS": "x"})


def test_a_missing_checkpoint_is_one_clear_error(tmp_path):
    from qwen3vl_epd.checkpoint import load_config

    with pytest.raises(FileNotFoundError, match="set EPD_CHECKPOINT .* or build the embedded tiny one with scripts/setup"):
        load_config(tmp_path / "nowhere")
