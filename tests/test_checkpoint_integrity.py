"""checkpoint.verify_checksums: with it on (the default) a save writes checksums.json and a load refuses a
file whose bytes changed; with it off neither happens, while the model-identity and no-code-in-pickles
checks still run. Function level (Checkpointer._publish / _check_before_load) in one process with a
world-size-1 gloo group: no training, no megatron save. tests/test_fault_tolerance.py covers the same
refusal end to end through the trainer."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.distributed as dist

from melama_mcore.checkpoint.checkpointer import Checkpointer
from melama_mcore.checkpoint.layout import CHECKSUMS, IDENTITY
from melama_mcore.config.job_config import load_config
from melama_mcore.errors import CheckpointError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A one-rank process group (the checksum work is split over ranks with collectives)."""
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


IDENT = {"arch": {"hidden_size": 64, "num_layers": 2}, "tokenizer": None}


def checkpointer(tmp_path, verify: bool, identity=IDENT) -> Checkpointer:
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"checkpoint.verify_checksums={str(verify).lower()}"])
    assert cfg.checkpoint.verify_checksums is verify
    return Checkpointer(cfg, model_chunks=[], optimizer=None, scheduler=None, identity=identity)


def saved(tmp_path, verify: bool):
    """What megatron leaves in a .partial folder, published by the Checkpointer; -> the final folder."""
    partial, final = tmp_path / "iter_0000002.partial", tmp_path / "iter_0000002"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (partial / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    torch.save({"train_state": {"step": 2}}, partial / "common.pt")
    checkpointer(tmp_path, verify)._publish(partial, final)
    assert final.is_dir() and not partial.exists()
    return final


def corrupt(folder):
    victim = folder / "__0_0.distcp"
    raw = bytearray(victim.read_bytes())
    raw[100:116] = bytes(b ^ 0xFF for b in raw[100:116])  # same size, silent garbage
    victim.write_bytes(bytes(raw))
    return victim


def test_verify_on_writes_checksums_and_refuses_a_corrupt_file(world, tmp_path):
    folder = saved(tmp_path, verify=True)
    names = set(json.loads((folder / CHECKSUMS).read_text()))
    assert names == {"__0_0.distcp", "metadata.json", "common.pt"}
    assert (folder / IDENTITY).is_file() and (folder / "config.yaml").is_file()
    checkpointer(tmp_path, verify=True)._check_before_load(folder)  # intact: loads
    victim = corrupt(folder)
    with pytest.raises(CheckpointError, match="checksum") as err:
        checkpointer(tmp_path, verify=True)._check_before_load(folder)
    assert str(victim) in str(err.value) and "corrupt or truncated" in str(err.value)


def test_verify_off_writes_no_checksums_and_does_not_read_them(world, tmp_path):
    folder = saved(tmp_path, verify=False)
    assert not (folder / CHECKSUMS).exists()
    assert (folder / IDENTITY).is_file() and (folder / "config.yaml").is_file()
    corrupt(folder)
    checkpointer(tmp_path, verify=False)._check_before_load(folder)  # past the checksum stage


def test_verify_off_loads_a_checkpoint_saved_with_checksums(world, tmp_path):
    folder = saved(tmp_path, verify=True)
    corrupt(folder)
    checkpointer(tmp_path, verify=False)._check_before_load(folder)  # checksums.json present, not read


def test_verify_on_without_checksums_warns_and_says_why(world, tmp_path, caplog):
    folder = saved(tmp_path, verify=False)
    with caplog.at_level(logging.WARNING, logger="melama_mcore.checkpoint.integrity"):
        checkpointer(tmp_path, verify=True)._check_before_load(folder)  # as for an older checkpoint
    assert any("cannot be verified" in r.getMessage() and "checkpoint.verify_checksums=false" in r.getMessage()
               for r in caplog.records), caplog.text


def test_identity_and_pickle_checks_stay_on_with_verify_off(world, tmp_path):
    folder = saved(tmp_path, verify=False)
    other = {"arch": {"hidden_size": 128, "num_layers": 2}, "tokenizer": None}
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 64, this run 128"):
        checkpointer(tmp_path, verify=False, identity=other)._check_before_load(folder)
    torch.save({"train_state": _Evil()}, folder / "common.pt")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        checkpointer(tmp_path, verify=False)._check_before_load(folder)


class _Evil:
    def __reduce__(self):
        return (print, ("a checkpoint pickle ran code",))
