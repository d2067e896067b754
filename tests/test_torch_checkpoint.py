"""The PyTorch checkpoint reader reads real state dicts and never runs a pickled global.

The two tiny fixtures were written by torch 2.13 (in a throwaway venv, never a dependency):

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = OrderedDict([("conv.weight", base), ("fc.weight", base.t()),
                      ("fc.bias", torch.arange(3, dtype=torch.float64)),
                      ("bn.num_batches_tracked", torch.tensor(7)),
                      ("half", torch.tensor([0.5, -2.0], dtype=torch.float16))])
    torch.save(sd, "tiny_state_zip.pth")
    torch.save(sd, "tiny_state_legacy.pth", _use_new_zipfile_serialization=False)
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ecg_mlflow.model.efficientnet_lite import packaged_checkpoint
from ecg_mlflow.model.torch_checkpoint import LEGACY_MAGIC, LEGACY_PROTOCOL, CheckpointError, load_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
SYS_INFO = {"protocol_version": LEGACY_PROTOCOL, "little_endian": True, "type_sizes": {"int": 4}}


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_both_torch_formats_give_the_tensors_with_views_and_dtypes(layout):
    state = load_state_dict(FIXTURES / f"tiny_state_{layout}.pth")
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert list(state) == ["conv.weight", "fc.weight", "fc.bias", "bn.num_batches_tracked", "half"]
    np.testing.assert_array_equal(state["conv.weight"], base)
    np.testing.assert_array_equal(state["fc.weight"], base.T)  # a strided view of the same storage
    assert state["fc.bias"].dtype == np.float64 and state["fc.bias"].tolist() == [0.0, 1.0, 2.0]
    assert state["bn.num_batches_tracked"].shape == () and int(state["bn.num_batches_tracked"]) == 7
    assert state["half"].dtype == np.float16 and state["half"].tolist() == [0.5, -2.0]


def test_packaged_lite0_checkpoint_loads():
    state = load_state_dict(packaged_checkpoint("lite0"))
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(a).all() for a in state.values())
    assert (state["_bn1.running_var"] > 0).all()  # variances: the bytes landed in the right tensors


class _RunsCommand:
    """Pickles as a call of os.system, as a malicious weights file would."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _legacy_stream(*objects) -> bytes:
    """A legacy checkpoint's pickle sequence with `objects` in place of the state dict."""
    stream = io.BytesIO()
    for obj in (LEGACY_MAGIC, LEGACY_PROTOCOL, SYS_INFO, *objects):
        pickle.dump(obj, stream, protocol=2)
    return stream.getvalue()


def _zip_checkpoint(data_pkl: bytes) -> bytes:
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
    return stream.getvalue()


@pytest.mark.parametrize("where", ["whole file", "state dict of a legacy file", "data.pkl of a zip file"])
def test_a_pickled_os_system_is_refused_without_running(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = _RunsCommand(f"touch {marker}")
    blob = {
        "whole file": pickle.dumps(payload, protocol=2),
        "state dict of a legacy file": _legacy_stream({"weight": payload}, []),
        "data.pkl of a zip file": _zip_checkpoint(pickle.dumps({"weight": payload}, protocol=2)),
    }[where]
    path = tmp_path / "evil.pth"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=r"refuses the global (posix|os|nt)\.system") as info:
        load_state_dict(path)
    assert "may only hold tensors" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "print"), ("torch", "load"), ("collections", "namedtuple")])
def test_any_other_global_is_refused_too(tmp_path, module, name):
    # GLOBAL module name, EMPTY_TUPLE, REDUCE, STOP: a call of module.name(); an allowed
    # module (torch, collections) does not let another of its names through.
    call = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    path = tmp_path / "other.pth"
    path.write_bytes(_legacy_stream() + call)
    with pytest.raises(CheckpointError, match=f"refuses the global {module}.{name}"):
        load_state_dict(path)


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "plain.pth"
    path.write_bytes(_legacy_stream({"weight": 1.0}, []))
    with pytest.raises(CheckpointError, match="entry 'weight' is not a tensor"):
        load_state_dict(path)
