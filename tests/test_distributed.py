"""`celldino.distributed`: the one process/device set-up of train and extract.

NCCL needs GPUs, so the GPU path is checked by recording the calls it makes under a faked
torchrun environment (LOCAL_RANK=1 of 2): `torch.cuda.set_device(cuda:1)` must come before
`init_process_group("nccl")`, or every rank's communicator is built on cuda:0. The gloo path
runs for real in one process (and with two ranks in test_extract / test_train_distributed).
"""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from celldino import distributed
from celldino.config import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src" / "celldino"


@pytest.fixture
def fake_gpu_rank(monkeypatch):
    """torchrun's env for local rank 1 of 2, a visible GPU, and a recorder of the calls."""
    calls: list[tuple] = []
    state = {"init": False}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))

    def init(backend=None, **kw):
        calls.append(("init_process_group", backend))
        state["init"] = True

    def destroy(*a, **kw):
        calls.append(("destroy_process_group",))
        state["init"] = False

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    monkeypatch.setattr(dist, "is_initialized", lambda: state["init"])
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    return calls


@pytest.mark.parametrize("key", ["train.device", "extract.device"])
@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_set_device_comes_before_nccl_init(fake_gpu_rank, key, device):
    info = distributed.setup(device, key=key)
    assert fake_gpu_rank == [("set_device", "cuda:1"), ("init_process_group", "nccl")]
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    assert info.device == torch.device("cuda", 1) and info.owns_group
    distributed.teardown(info)
    assert fake_gpu_rank[-1] == ("destroy_process_group",)


def test_a_group_the_caller_made_is_used_and_left_alone(fake_gpu_rank):
    dist.init_process_group("nccl")  # the caller's (recorded by the fake)
    fake_gpu_rank.clear()
    info = distributed.setup("auto", key="extract.device")
    assert fake_gpu_rank == [("set_device", "cuda:1")]  # no second init
    assert not info.owns_group
    distributed.teardown(info)
    assert ("destroy_process_group",) not in fake_gpu_rank


def test_train_and_extract_initialise_processes_only_through_it():
    """No other module calls init_process_group or set_device (one place keeps the order)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "distributed.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in (
                "init_process_group",
                "set_device",
            ):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {node.attr}")
    assert not offenders, offenders
    extractor = (SRC / "extract" / "extractor.py").read_text()
    assert 'distributed.setup(cfg.device, key="extract.device")' in extractor


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("key", ["train.device", "extract.device"])
def test_cuda_without_a_gpu_names_the_key(key, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=rf"{key}=cuda:0 but no CUDA GPU is visible"):
        distributed.setup("cuda", key=key)


def test_gloo_single_process_group_on_cpu(monkeypatch):
    """A real gloo group of one: setup joins it, averaging over ranks is the identity, and
    teardown leaves the caller's group in place."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        info = distributed.setup("cpu")
        assert (info.rank, info.world_size, info.device.type) == (0, 1, "cpu")
        assert not info.owns_group
        assert distributed.mean_over_ranks({"a": 1.5, "b": -2.0}, info.device) == {
            "a": 1.5,
            "b": -2.0,
        }
        info.barrier()
        distributed.teardown(info)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    alone = distributed.setup("cpu")
    assert (alone.rank, alone.world_size, alone.owns_group) == (0, 1, False)
