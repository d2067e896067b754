"""Explanations: the template regions, Grad-CAM from cached region maps against Grad-CAM by
GradientTape on the whole model, the cache pass, occlusion, and a planted signal."""

from __future__ import annotations

import numpy as np
import pytest

from ecg_mlflow.data.preprocess import load_batch
from ecg_mlflow.model import regions
from ecg_mlflow.model.features import FeatureKey, extract_features
from ecg_mlflow.model.region_cache import (
    RegionMapCache, extract_features_and_region_maps, load_full_maps, shared_maps_model,
)
from ecg_mlflow.synth.reports import synthesize_report

HEIGHT, WIDTH = 128, 256
ARCH = "efficientnetlite0"
GRADCAM_TOLERANCE = 1e-4
"""Max |direct - cached| region attribution, relative to the largest |attribution| of the
image: the two routes sum the same float32 products of 1280 channels and 4 x 8 cells in
different orders, so they differ by rounding only (a wrong formula is off by O(1))."""


def test_regions_partition_every_input_and_crop_grid_drops_the_text():
    for crop in ("none", "grid"):
        for shape in ((16, 32), (4, 8), (314, 442), (7, 5)):
            weights = regions.region_weights(*shape, crop)
            assert weights.shape == (len(regions.REGIONS), *shape)
            np.testing.assert_allclose(weights.sum(axis=0), 1.0, atol=1e-5)
            masks = regions.pixel_masks(*shape, crop)
            assert (masks.sum(axis=0) == 1).all()
    grid = regions.region_weights(64, 128, "grid")
    for name in regions.TEXT_REGIONS:
        assert grid[regions.REGION_NAMES.index(name)].sum() == 0
    whole = regions.region_weights(1572, 2213, "none")
    header = whole[regions.REGION_NAMES.index("header")]
    assert abs(header.sum() - 287 * 2213) < 2213  # the page above the grid (y < 287)
    assert len(regions.REGIONS) == 16 and len(set(regions.REGION_SLUGS)) == 16


def test_the_template_matches_the_drawn_report():
    """Ink (dark pixels) of a synthetic report: the header holds the title and exam ID, the
    footer the heart rate line, every lead panel and the rhythm strip its trace."""
    image, _ = synthesize_report("NORM", seed=0, index=1, width=1106, height=786)
    ink = (np.asarray(image).min(axis=2) < 100)
    masks = regions.pixel_masks(786, 1106, "none")
    for index, name in enumerate(regions.REGION_NAMES):
        count = int((ink & masks[index]).sum())
        if name == "margin":
            continue
        assert count > 50, f"no ink in region {name}"
    rows = ink.any(axis=1).nonzero()[0]  # the text reaches the page's top and bottom tenth
    assert rows.min() < 0.1 * 786 and rows.max() > 0.96 * 786


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reports")
    paths = {}
    for index, cls in enumerate(("MI", "NORM", "AHB"), start=1):
        image, _ = synthesize_report(cls, seed=3, index=index, width=442, height=314)
        path = folder / f"{cls}.png"
        image.save(path)
        paths[f"{index:064x}"] = path
    return paths


def _direct_gradcam(extractor, head, pixels: np.ndarray, crop: str) -> np.ndarray:
    """Grad-CAM by the book, independent of model/explain.py: the last convolution's output
    A, the gradient of each class logit wrt A by GradientTape through pooling and the head,
    alpha = that gradient's spatial mean, L = sum_k alpha_k A_k, summed per region."""
    import keras
    import tensorflow as tf

    backbone = extractor.layers[-1]
    conv = keras.Model(backbone.inputs, backbone.layers[-1].input)
    scaling = extractor.get_layer("input_scaling")
    hidden = keras.Model(head.inputs, head.get_layer("probabilities").input)
    last = head.get_layer("probabilities")
    out = []
    for c in range(4):
        x = tf.constant(pixels)
        with tf.GradientTape() as tape:
            maps = conv(scaling(x))
            tape.watch(maps)
            logits = tf.matmul(hidden(tf.reduce_mean(maps, axis=(1, 2))), last.kernel) + last.bias
            score = tf.reduce_sum(logits[:, c])
        grads = tape.gradient(score, maps).numpy()
        alpha = grads.mean(axis=(1, 2))
        cam = np.einsum("nhwk,nk->nhw", maps.numpy(), alpha)
        weights = regions.region_weights(*cam.shape[1:], crop)
        out.append(np.einsum("nhw,rhw->nr", cam, weights))
    return np.stack(out, axis=1)


@pytest.mark.parametrize("crop", ["none", "grid"])
def test_gradcam_from_cached_region_maps_equals_gradient_tape_on_the_whole_model(reports, tmp_path, crop):
    import keras

    from ecg_mlflow.model.backbones import shared_feature_extractor
    from ecg_mlflow.model.explain import explain_pooled, explain_pixels
    from ecg_mlflow.model.head import build_head

    key = FeatureKey(ARCH, "imagenet", HEIGHT, WIDTH, crop)
    features, pooled, stats = extract_features_and_region_maps(reports, key, tmp_path)
    assert stats.misses == len(reports)
    keras.utils.set_random_seed(7)
    head = build_head(1280, (32,), 0.2)
    shas = sorted(reports)
    cached = explain_pooled(head, np.stack([features[s] for s in shas]), np.stack([pooled[s] for s in shas]))

    extractor = shared_feature_extractor(ARCH, "imagenet", HEIGHT, WIDTH)
    pixels = load_batch([reports[s] for s in shas], HEIGHT, WIDTH, crop)
    direct = _direct_gradcam(extractor, head, pixels, crop)
    scale = np.abs(direct).max(axis=(1, 2), keepdims=True)
    assert np.abs(direct - cached.attribution).max() / scale.min() < GRADCAM_TOLERANCE
    # The region maps split the pooled features: summed over regions they give them back.
    for sha in shas:
        np.testing.assert_allclose(pooled[sha].sum(axis=0), features[sha], rtol=1e-4, atol=1e-5)
    # From the full maps (the overlay route) the same numbers, and the region sums of the map.
    full = explain_pixels(shared_maps_model(key), head, pixels, crop)
    np.testing.assert_allclose(full.attribution, cached.attribution, rtol=1e-4, atol=1e-4 * scale.min())
    if crop == "grid":
        assert np.all(cached.text_shares == 0)


def test_the_cache_pass_gives_the_features_of_the_plain_pass_and_is_not_repeated(reports, tmp_path, monkeypatch):
    key = FeatureKey(ARCH, "imagenet", HEIGHT, WIDTH, "none")
    plain, _ = extract_features(reports, key, tmp_path / "plain")
    features, pooled, first = extract_features_and_region_maps(reports, key, tmp_path / "both")
    for sha in reports:
        np.testing.assert_allclose(features[sha], plain[sha], atol=1e-6)
    import ecg_mlflow.model.backbones

    monkeypatch.setattr(ecg_mlflow.model.backbones, "shared_feature_extractor",
                        lambda *a, **k: pytest.fail("the backbone ran although everything was cached"))
    again, pooled_again, second = extract_features_and_region_maps(reports, key, tmp_path / "both")
    assert (first.misses, second.misses, second.hits) == (len(reports), 0, len(reports))
    for sha in reports:
        np.testing.assert_array_equal(pooled_again[sha], pooled[sha])
    # A damaged entry is recomputed, never trusted.
    cache = RegionMapCache(tmp_path / "both", key)
    path = cache.entry_path(sorted(reports)[0])
    path.write_bytes(path.read_bytes()[:-5])
    assert cache.load(sorted(reports)[0]) is None


def test_full_maps_are_cached_for_the_overlay_sample(reports, tmp_path):
    key = FeatureKey(ARCH, "imagenet", HEIGHT, WIDTH, "none")
    first = load_full_maps(reports, key, tmp_path)
    again = load_full_maps(reports, key, tmp_path)
    for sha, maps in first.items():
        assert maps.shape == (4, 8, 1280)
        np.testing.assert_array_equal(again[sha], maps)


def test_overlay_pictures_decode_each_file_once_and_again_once_it_changes(real_images, tmp_path):
    """Every seed of a study overlays the same test images: they are decoded by the first
    and shared (read-only), unless the file changed on disk since."""
    import shutil

    from ecg_mlflow.data.preprocess import load_pixels
    from ecg_mlflow.tracking.model_logging import image_pixels

    first, second = sorted(real_images.glob("*/*.jpg"))[:2]
    path = tmp_path / "report.jpg"
    shutil.copyfile(first, path)
    pixels = image_pixels(path, HEIGHT, WIDTH, "none")
    assert image_pixels(path, HEIGHT, WIDTH, "none") is pixels and not pixels.flags.writeable
    np.testing.assert_array_equal(pixels, load_pixels(first, HEIGHT, WIDTH, "none"))
    shutil.copyfile(second, path)
    np.testing.assert_array_equal(image_pixels(path, HEIGHT, WIDTH, "none"), load_pixels(second, HEIGHT, WIDTH, "none"))


def test_the_feature_pass_keeps_the_full_maps_it_is_asked_for(reports, tmp_path, monkeypatch):
    """The overlay sample's full maps come from the feature pass itself: load_full_maps then
    finds them without a backbone pass, equal to the ones its own pass computes."""
    import ecg_mlflow.model.region_cache as region_cache

    key = FeatureKey(ARCH, "imagenet", HEIGHT, WIDTH, "none")
    kept, skipped = sorted(reports)[:2], sorted(reports)[2:]
    extract_features_and_region_maps(reports, key, tmp_path / "pass", full_maps_of=set(kept))
    own_pass = load_full_maps({s: reports[s] for s in kept}, key, tmp_path / "own")
    monkeypatch.setattr(region_cache, "run_maps_pass", lambda *a, **k: pytest.fail("a second backbone pass"))
    found = load_full_maps({s: reports[s] for s in kept}, key, tmp_path / "pass")
    for sha in kept:
        np.testing.assert_array_equal(found[sha], own_pass[sha])
    cache = region_cache.FullMapCache(tmp_path / "pass", key)
    assert all(cache.load(sha) is None for sha in skipped)


def test_occlusion_drops_only_regions_in_the_input(reports):
    import keras

    from ecg_mlflow.model.backbones import shared_feature_extractor
    from ecg_mlflow.model.explain import occlusion_drops
    from ecg_mlflow.model.head import build_head

    keras.utils.set_random_seed(3)
    head = build_head(1280, (16,), 0.2)
    extractor = shared_feature_extractor(ARCH, "imagenet", HEIGHT, WIDTH)
    inputs = keras.Input((HEIGHT, WIDTH, 3))
    model = keras.Model(inputs, head(extractor(inputs)))
    pixels = load_batch(list(reports.values())[:1], HEIGHT, WIDTH, "grid")
    drops, predicted = occlusion_drops(lambda p: np.asarray(model.predict_on_batch(p)), pixels, "grid")
    assert drops.shape == (1, len(regions.REGIONS))
    for name in regions.TEXT_REGIONS:
        assert drops[0, regions.REGION_NAMES.index(name)] == 0
    assert np.abs(drops).sum() > 0


@pytest.mark.parametrize("crop", ["none", "grid"])
def test_a_train_run_logs_explanations_and_text_shares(tmp_path, tracking_uri, crop):
    import mlflow
    import pandas as pd
    from PIL import Image

    from ecg_mlflow import schema
    from ecg_mlflow.config import parse_train_config
    from ecg_mlflow.synth.reports import write_synthetic_dataset
    from ecg_mlflow.train import train_and_log

    data = write_synthetic_dataset(tmp_path / "demo", per_class=6, seed=0, width=442, height=314,
                                   duplicates=0.0).out
    config = parse_train_config(arch=ARCH, seed="1", data=str(data), weights="imagenet", image_height="64",
                                image_width="128", max_epochs="3", crop=crop, cache_dir=str(tmp_path / "cache"),
                                log_model="false")
    mlflow.set_experiment(schema.DEFAULT_EXPERIMENT)
    with mlflow.start_run():
        result = train_and_log(config, progress=False)
    run = mlflow.get_run(result.run_id)
    assert set(schema.TEXT_SHARE_METRICS) <= set(run.data.metrics)
    share = run.data.metrics[schema.METRIC_TEXT_SHARE]
    assert 0.0 <= share <= 1.0 and (crop == "none" or share == 0.0)
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, schema.ARTIFACT_EXPLANATIONS)}
    assert {schema.ARTIFACT_REGION_TABLE, schema.ARTIFACT_REGION_CHART} <= files
    test_classes = set(pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path=schema.ARTIFACT_PREDICTIONS))[schema.COL_TRUE])
    assert {schema.overlay_artifact(c, 1) for c in test_classes} <= files
    with Image.open(mlflow.artifacts.download_artifacts(
            run_id=result.run_id, artifact_path=schema.overlay_artifact(sorted(test_classes)[0], 1))) as overlay:
        assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.width == config.image_width
    table = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path=schema.ARTIFACT_REGION_TABLE))
    assert len(table) == len(result.split.test)
    assert [schema.attribution_column(s) for s in regions.REGION_SLUGS] == list(table.columns[-len(regions.REGIONS):])
    np.testing.assert_allclose(table[schema.COL_TEXT_SHARE].mean(), share, rtol=1e-6)
    # The aggregation across crops reads the same numbers back from the tracked runs.
    from analysis.explanations import finished_train_runs, region_share_frame, text_share_frame

    client = mlflow.MlflowClient()
    runs = finished_train_runs(client, schema.DEFAULT_EXPERIMENT)
    shares = text_share_frame(runs)
    assert list(shares["crop"]) == [crop] and shares[schema.METRIC_TEXT_SHARE].iloc[0] == pytest.approx(share)
    by_region = region_share_frame(client, runs)
    assert set(by_region[schema.COL_TRUE]) == set(table[schema.COL_TRUE])
    total = by_region[list(regions.REGION_SLUGS)].sum(axis=1)  # 1 unless an image had no positive region
    assert ((total > 0) & (total <= 1 + 1e-6)).all()


def test_a_head_that_can_only_read_the_header_puts_its_attribution_there(tmp_path):
    """Planted signal: reports of one class, half of them with a black mark printed in the
    header and labelled MI, the others NORM. Traces cannot tell them apart, so a head that
    separates them reads the header, and Grad-CAM from the cached region maps says so."""
    from PIL import ImageDraw

    from ecg_mlflow.data.classes import CLASSES
    from ecg_mlflow.model.explain import explain_pooled
    from ecg_mlflow.model.head import HeadConfig, one_hot, train_head

    paths, labels = {}, {}
    for index in range(16):
        image, _ = synthesize_report("NORM", seed=5, index=index + 1, width=442, height=314)
        marked = index % 2 == 0
        if marked:
            ImageDraw.Draw(image).rectangle([0.25 * 442, 0.02 * 314, 0.75 * 442, 0.15 * 314], fill=(0, 0, 0))
        sha = f"{index:064x}"
        paths[sha] = tmp_path / f"{index}.png"
        image.save(paths[sha])
        labels[sha] = "MI" if marked else "NORM"
    key = FeatureKey(ARCH, "imagenet", 256, 512, "none")
    features, pooled, _ = extract_features_and_region_maps(paths, key, tmp_path / "cache")
    shas = sorted(paths)
    x, y = np.stack([features[s] for s in shas]), one_hot([labels[s] for s in shas])
    head, _ = train_head(x, y, x, y, HeadConfig(dense_units=(64,), max_epochs=60, patience=60), seed=1)
    explained = explain_pooled(head, x, np.stack([pooled[s] for s in shas]))
    marked = [i for i, s in enumerate(shas) if labels[s] == "MI"]
    assert all(CLASSES[p] == labels[s] for p, s in zip(explained.predicted, shas)), "the head did not learn the mark"
    header = regions.REGION_NAMES.index("header")
    assert all(int(np.argmax(explained.of_predicted[i])) == header for i in marked)
    # The text regions hold 22% of the page; the marked images give them more than that of
    # the positive attribution (0.29..0.38 seen), although the mark covers 6% of the page.
    text_area = regions.region_weights(256, 512, "none")[list(regions.TEXT_INDEX)].sum() / (256 * 512)
    assert (explained.text_shares[marked] > text_area).all()
