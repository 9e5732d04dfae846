"""config.pbtxt parameters → Settings."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from qwen3vl_epd.settings import DEFAULT_CHECKPOINT, EncoderSettings, LanguageSettings, pbtxt_parameters

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1] / "model_repository"


SIDES = {"encoder": EncoderSettings, "language": LanguageSettings}


@pytest.mark.parametrize("model", ["encoder", "language"])
def test_shipped_configs_parse(model):
    params = pbtxt_parameters(REPO / model / "config.pbtxt")
    assert "checkpoint" in params and "max_model_len" in params
    s = SIDES[model].from_parameters({k: {"string_value": v} for k, v in params.items()}, env={})
    assert s.checkpoint_dir == str(DEFAULT_CHECKPOINT) and s.mooncake_protocol == "tcp"


def test_types_env_override_and_unknown_keys():
    s = LanguageSettings.from_parameters({"chunk_tokens": "128", "allowed_encoder_hosts": "a, b",
                                          "dtype": "bfloat16"}, env={"EPD_CHECKPOINT": "/models/x"})
    e = EncoderSettings.from_parameters({"handle_ttl_s": "2.5"}, env={})
    assert (s.chunk_tokens, e.handle_ttl_s, s.allowed_encoder_hosts) == (128, 2.5, ["a", "b"])
    assert s.checkpoint_dir == "/models/x" and s.torch_dtype(None) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown parameter 'chunk_size'"):
        LanguageSettings.from_parameters({"chunk_size": "1"}, env={})
    with pytest.raises(ValueError, match="unknown parameter 'handle_ttl_s'"):  # the encoder's, not the language model's
        LanguageSettings.from_parameters({"handle_ttl_s": "1"}, env={})
    with pytest.raises(ValueError, match="'chunk_tokens': 'many' is not a valid int"):
        LanguageSettings.from_parameters({"chunk_tokens": "many"}, env={})
    json.dumps(LanguageSettings().__dict__)  # plain values only
    json.dumps(EncoderSettings().__dict__)


def test_every_setting_has_an_environment_override():
    s = LanguageSettings.from_parameters({"encoders": "127.0.0.1:8001", "encoder_wait_s": "10"},
                                 env={"EPD_ENCODERS": "ipv4:10.0.1.2:8001,10.0.2.2:8001", "EPD_ENCODER_WAIT_S": "2.5",
                                      "EPD_ALLOWED_ENCODER_HOSTS": "10.0.0.0/16, enc.example"})
    assert s.encoders == "ipv4:10.0.1.2:8001,10.0.2.2:8001" and s.encoder_wait_s == 2.5
    assert s.allowed_encoder_hosts == ["10.0.0.0/16", "enc.example"]
    with pytest.raises(ValueError, match="'EPD_CHUNK_TOKENS': 'x' is not a valid int"):
        LanguageSettings.from_parameters({}, env={"EPD_CHUNK_TOKENS": "x"})


def test_a_missing_checkpoint_is_one_clear_error(tmp_path):
    from qwen3vl_epd.checkpoint.reader import load_config

    with pytest.raises(FileNotFoundError, match="set EPD_CHECKPOINT .* or build the embedded tiny one with scripts/setup"):
        load_config(tmp_path / "nowhere")


def readme_settings_table() -> list[tuple[str, str, str]]:
    """The README's settings table: (parameter, model column, default column), a row per parameter
    and model column (a parameter whose default differs per side has a row for each)."""
    text = (REPO.parent / "README.md").read_text()
    rows = []
    for line in text[text.index("| parameter | model | default |"):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        names, model, default = [c.strip() for c in line.strip("|").split("|")][:3]
        for name, value in zip(re.findall(r"`(\w+)`", names), re.split(r",\s*", default)):
            rows.append((name, model, value))
    return rows


def readme_value(field, value: str):
    """A README default as the dataclass holds it ("20 MiB", "50 M", "this host", "(none)", "tiny")."""
    words = {"tiny": "", "this host": [], "(none)": "", "none": "", "true": True, "false": False}
    if value in words:
        return words[value]
    units = {"MiB": 2**20, "M": 10**6}
    number, _, unit = value.partition(" ")
    kind = type(field.default)
    return kind(float(number) * units[unit]) if unit else kind(number)


@pytest.mark.parametrize("model", ["encoder", "language"])
def test_configs_and_readme_state_the_dataclass_defaults(model):
    """One source of defaults: every parameter of a config.pbtxt, and every default the README's
    table gives, is the dataclass's own (a config that disagreed would silently change a default)."""
    side = SIDES[model]
    fields = {f.name: f for f in dataclasses.fields(side)}
    shipped = side.from_parameters(pbtxt_parameters(REPO / model / "config.pbtxt"), env={})
    assert shipped == side(), {k: v for k, v in vars(shipped).items() if v != getattr(side(), k)}
    for name, where, value in readme_settings_table():
        assert where in ("both", "encoder", "language", "both / language"), name
        if name in fields and (where == "both" or where == model or name == "default_max_tokens"):
            assert readme_value(fields[name], value) == getattr(side(), name), (name, value)
    documented = {name for name, _, _ in readme_settings_table()}
    assert set(fields) - documented <= {"mooncake_device", "mooncake_metadata_server"}, set(fields) - documented
