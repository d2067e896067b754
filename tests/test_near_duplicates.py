"""The multi-index near-duplicate search returns exactly what the all-pairs search returned."""

from __future__ import annotations

import numpy as np
import pytest

from ecg_mlflow.data import near_duplicates
from ecg_mlflow.data.manifest import build_manifest
from ecg_mlflow.data.hashing import HASH_BITS, NEAR_DUPLICATE_DISTANCE, _reference_near_pairs, hash_distance, near_pairs

PLANTED = (0, 1, NEAR_DUPLICATE_DISTANCE - 1, NEAR_DUPLICATE_DISTANCE, NEAR_DUPLICATE_DISTANCE + 1)


def random_hashes(rng: np.random.Generator, n: int, share_of_ones: float = 0.5) -> list[str]:
    bits = rng.random((n, HASH_BITS)) < share_of_ones
    return [row.tobytes().hex() for row in np.packbits(bits, axis=1)]


def flip(hex_hash: str, n_bits: int, rng: np.random.Generator) -> str:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(hex_hash), dtype=np.uint8))
    bits[rng.choice(len(bits), n_bits, replace=False)] ^= 1
    return np.packbits(bits).tobytes().hex()


def test_equals_the_all_pairs_search_on_the_real_reports_and_their_originals(real_images, real_originals):
    """ecg-images holds byte-identical copies (distance 0); the untouched originals are the
    half-size copies' near duplicates (distances up to 56)."""
    records = build_manifest(real_images).records + build_manifest(real_originals).records
    hashes = [r.dhash for r in records]
    found = near_pairs(hashes)
    assert found == _reference_near_pairs(hashes)
    distances = {hash_distance(hashes[i], hashes[j]) for i, j in found}
    assert 0 in distances and max(distances) > 0


def test_planted_pairs_are_found_up_to_the_threshold_and_not_beyond():
    rng = np.random.default_rng(7)
    hashes = random_hashes(rng, 3000)
    planted = {}
    for k, distance in enumerate(PLANTED):
        hashes[-1 - k] = flip(hashes[k], distance, rng)
        planted[(k, len(hashes) - 1 - k)] = distance
    found = near_pairs(hashes)
    assert found == _reference_near_pairs(hashes)
    expected = sorted(pair for pair, d in planted.items() if d <= NEAR_DUPLICATE_DISTANCE)
    assert found == expected  # random 1024-bit hashes lie near 512 apart: only the planted pairs


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0, 5, NEAR_DUPLICATE_DISTANCE, 100, 300])
def test_equals_the_all_pairs_search_on_random_hashes_at_any_threshold(seed, threshold):
    """300 leaves blocks under MIN_BLOCK_BITS: the dense path. Skewed bits (10% ones) make
    pairs at every distance and buckets of all sizes; copies give distance 0."""
    rng = np.random.default_rng(seed)
    hashes = random_hashes(rng, 600, share_of_ones=0.1 if seed % 2 else 0.5)
    hashes += [flip(h, int(rng.integers(0, 2 * threshold + 2)), rng) for h in hashes[:100]]
    hashes += hashes[:20]
    assert near_pairs(hashes, threshold) == _reference_near_pairs(hashes, threshold)


@pytest.mark.parametrize("candidate_cost", [0, 10**9])
def test_giant_buckets_and_small_batches_give_the_same_pairs(monkeypatch, candidate_cost):
    """Hashes that are nearly all zeros share most block values: buckets past LARGE_BUCKET go
    through the dense comparison, the rest through batched verification (candidate cost 0
    keeps the index whatever it proposes; a huge cost switches to the all-pairs comparison)."""
    monkeypatch.setattr(near_duplicates, "CANDIDATE_COST", candidate_cost)
    monkeypatch.setattr(near_duplicates, "LARGE_BUCKET", 8)
    monkeypatch.setattr(near_duplicates, "VERIFY_BATCH", 50)
    monkeypatch.setattr(near_duplicates, "DENSE_CELLS", 64)
    rng = np.random.default_rng(3)
    hashes = random_hashes(rng, 400, share_of_ones=0.03)
    assert near_pairs(hashes) == _reference_near_pairs(hashes)
    assert near_pairs(hashes, 20) == _reference_near_pairs(hashes, 20)


def test_blocks_partition_the_bits_and_spread_the_shared_ones():
    bits = np.zeros((50, HASH_BITS), dtype=np.uint8)
    bits[:, ::2] = np.random.default_rng(0).integers(0, 2, (50, HASH_BITS // 2))  # odd bits constant
    blocks = near_duplicates.plan_blocks(bits.mean(axis=0), NEAR_DUPLICATE_DISTANCE + 1)
    assert len(blocks) == NEAR_DUPLICATE_DISTANCE + 1
    assert sorted(np.concatenate(blocks).tolist()) == list(range(HASH_BITS))
    assert {len(b) for b in blocks} <= {15, 16}
    varying = [int(np.sum(b % 2 == 0)) for b in blocks]
    assert max(varying) - min(varying) <= 1


def test_trivial_inputs():
    assert near_pairs([]) == [] and near_pairs(["00" * (HASH_BITS // 8)]) == []
    assert near_pairs(["00" * (HASH_BITS // 8)] * 3, -1) == []
    assert near_pairs(["00" * (HASH_BITS // 8)] * 3) == [(0, 1), (0, 2), (1, 2)]
