"""scripts/wheels.py: which torch and Mooncake builds scripts/setup installs."""

import importlib.util
import os

import pytest

from support.prompts import ROOT

pytestmark = pytest.mark.unit

spec = importlib.util.spec_from_file_location("wheels", ROOT / "scripts" / "wheels.py")
wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheels)


def fake_nvidia_smi(tmp_path, monkeypatch, script: str) -> None:
    (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\n{script}\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_a_gpu_is_seen_only_when_nvidia_smi_lists_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not wheels.has_nvidia_gpu()  # no nvidia-smi at all
    fake_nvidia_smi(tmp_path, monkeypatch, "echo 'GPU 0: NVIDIA H200 (UUID: GPU-0)'")
    assert wheels.has_nvidia_gpu()
    fake_nvidia_smi(tmp_path, monkeypatch, "echo 'NVIDIA-SMI has failed: no devices were found'; exit 9")
    assert not wheels.has_nvidia_gpu()  # a driver without a device


def test_epd_device_overrides_the_machine():
    assert wheels.device_kind({}, gpu=True) == "cuda"
    assert wheels.device_kind({}, gpu=False) == "cpu"
    assert wheels.device_kind({"EPD_DEVICE": "cpu"}, gpu=True) == "cpu"
    assert wheels.device_kind({"EPD_DEVICE": "cuda:1"}, gpu=False) == "cuda"
    with pytest.raises(SystemExit, match="EPD_DEVICE: 'gpu' is not cpu, cuda or cuda:N"):
        wheels.device_kind({"EPD_DEVICE": "gpu"}, gpu=False)


def test_each_kind_installs_its_builds_at_the_same_pins():
    cpu, cuda = wheels.installs("cpu"), wheels.installs("cuda")
    assert cpu == [["torch==2.13.0"], ["mooncake-transfer-engine-non-cuda==0.3.13.post1"]]
    # the CUDA torch from the index alone: a local +cpu wheel must not win
    assert cuda == [["--isolated", "torch==2.13.0"], ["mooncake-transfer-engine==0.3.13.post1"]]
    assert wheels.other_mooncake("cuda") == "mooncake-transfer-engine-non-cuda"
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text().split()
