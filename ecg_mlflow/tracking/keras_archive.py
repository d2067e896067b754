"""The whole model's `.keras` archive, saved by Keras once per backbone and head shape, then
per seed with only the head's weights rewritten.

Every seed's whole model is the same frozen backbone under its own head. Keras' save walks
all of the backbone's few hundred layers for their state and serialises the whole graph
again for each seed (most of a second per run); the archive it writes is three members, of
which only the head's datasets in `model.weights.h5` differ between seeds, and the saving
date in `metadata.json`. So the first seed's archive, saved by Keras itself, is kept as
the template of its backbone and head configuration, and each later seed's archive is that
template with the head's kernels and biases written over. Keras is pinned; the layout this
relies on (the head's group found by its name, a layer's variables as `vars/0`, `vars/1`
in its weights' order, shapes as they are) is checked while writing, and where it does not
hold the seed is saved by Keras and becomes the template. tests/test_keras_archive.py
holds a patched archive equal, member for member, to the one Keras writes.
"""

from __future__ import annotations

import datetime
import io
import json
import threading
import zipfile
from collections import OrderedDict, defaultdict

import numpy as np

CONFIG_MEMBER, METADATA_MEMBER, WEIGHTS_MEMBER = "config.json", "metadata.json", "model.weights.h5"
TEMPLATES_KEPT = 2  # backbones a process holds a template for (a study trains them one after another)


class _Template:
    """A Keras-saved archive of one (backbone object, head configuration) and where the
    head's variables are in its weights file."""

    def __init__(self, extractor, members: dict[str, bytes], head_datasets: dict[str, tuple[str, ...]]):
        self.extractor = extractor  # kept, so that its id stays its own
        self.members = members
        self.head_datasets = head_datasets  # head layer name -> dataset paths, in its weights' order


_TEMPLATES: OrderedDict[tuple[int, str, str, str], _Template] = OrderedDict()
_TEMPLATES_LOCK = threading.Lock()


class WholeModelArchive:
    """What mlflow.keras.log_model is given instead of the whole model: MLflow's Keras flavour
    saves a `.keras` model by calling the model's `save(path)` and nothing else, and this
    writes the archive `save_whole_model` makes for the model."""

    def __init__(self, model):
        self.model = model

    def save(self, filepath, **_) -> None:
        save_whole_model(self.model, filepath)


def save_whole_model(model, filepath) -> None:
    """`model.save(filepath)`'s archive for the whole model `model` (extractor + head,
    engines.split_whole_model): from the template of this extractor and head configuration
    when there is one, else saved by Keras (and kept as the template)."""
    from ecg_mlflow.model.engines import split_whole_model

    extractor, head = split_whole_model(model)
    key = (id(extractor), model.name, str(model.input_shape), json.dumps(head.get_config(), sort_keys=True, default=str))
    with _TEMPLATES_LOCK:
        template = _TEMPLATES.get(key)
    if template is not None and template.extractor is extractor:
        weights = _patched_weights(template, head)
        if weights is not None:
            _write_archive(filepath, {**template.members, METADATA_MEMBER: _metadata(template), WEIGHTS_MEMBER: weights})
            return
    model.save(filepath)
    members = _read_archive(filepath)
    head_datasets = _head_datasets(members[WEIGHTS_MEMBER], head)
    if head_datasets is not None:
        with _TEMPLATES_LOCK:
            _TEMPLATES[key] = _Template(extractor, members, head_datasets)
            _TEMPLATES.move_to_end(key)
            while len(_TEMPLATES) > TEMPLATES_KEPT:
                _TEMPLATES.popitem(last=False)


def _read_archive(filepath) -> dict[str, bytes]:
    with zipfile.ZipFile(filepath) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _write_archive(filepath, members: dict[str, bytes]) -> None:
    """The members in Keras' order, uncompressed as Keras writes them."""
    with zipfile.ZipFile(filepath, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _metadata(template: _Template) -> bytes:
    """The template's metadata with today's saving date, in Keras' format."""
    metadata = json.loads(template.members[METADATA_MEMBER])
    metadata["date_saved"] = datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S")
    return json.dumps(metadata).encode()


def _head_datasets(weights: bytes, head) -> dict[str, tuple[str, ...]] | None:
    """Per head layer with weights, the paths of its datasets in the weights file, or None
    where the file is not laid out as expected: one group holding the head (its `vars`
    named like the head), in it one group per layer with a dataset per weight, of the
    weight's shape."""
    import h5py

    groups: dict[str, list[str]] = defaultdict(list)  # object name -> its groups ("" is the root)

    def visit(path, item):
        if isinstance(item, h5py.Group) and (path == "vars" or path.endswith("/vars")):
            groups[str(item.attrs.get("name", ""))].append(path[: -len("vars")])

    with h5py.File(io.BytesIO(weights), "r") as store:
        store.visititems(visit)
        if len(groups[head.name]) != 1:
            return None
        inside = groups[head.name][0] + "layers/"
        paths: dict[str, tuple[str, ...]] = {}
        for layer in (layer for layer in head.layers if layer.weights):
            found = [path for path in groups[layer.name] if path.startswith(inside)]
            datasets = tuple(f"{found[0]}vars/{i}" for i in range(len(layer.weights))) if len(found) == 1 else ()
            if not datasets or any(d not in store or store[d].shape != tuple(w.shape)
                                   for d, w in zip(datasets, layer.weights)):
                return None
            paths[layer.name] = datasets
    return paths


def _patched_weights(template: _Template, head) -> bytes | None:
    """The template's weights file with this head's variables written over; None where
    the head's layers are not the template's."""
    import h5py

    layers = {layer.name: layer for layer in head.layers if layer.weights}
    if set(layers) != set(template.head_datasets):
        return None
    buffer = io.BytesIO(template.members[WEIGHTS_MEMBER])
    with h5py.File(buffer, "r+") as store:
        for name, datasets in template.head_datasets.items():
            for path, variable in zip(datasets, layers[name].weights):
                values = np.asarray(variable.numpy())
                if store[path].shape != values.shape or store[path].dtype != values.dtype:
                    return None
                store[path][...] = values
    return buffer.getvalue()


def clear_templates() -> None:
    """Forget every template (tests)."""
    with _TEMPLATES_LOCK:
        _TEMPLATES.clear()
