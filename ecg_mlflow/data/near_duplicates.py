"""Near-duplicate search by multi-index hashing: exact, sub-quadratic on spread hashes, bounded memory.

Two hashes within Hamming distance t, cut into t + 1 disjoint blocks of bits, agree exactly on
at least one block (pigeonhole: t differing bits cannot touch all t + 1 blocks). So every hash
goes into one bucket per block, keyed by the block's value; pairs that share a bucket are the
candidates, and those whose full distance is at most t are the answer. The result equals the
all-pairs search; nothing is approximate.

Blocks are not contiguous bit ranges. ECG reports share one layout, so whole regions of the
ink-map dHash are blank on nearly every report: on the 491 unique real reports a contiguous
16-bit block puts 489 of them into one bucket. Bits are instead dealt to blocks in snake order
of how often two hashes differ on them (2 p (1 - p), p the bit's share of ones), so every block
gets a similar mix; the largest real bucket then holds 35. A bucket that still grows past
LARGE_BUCKET is compared all against all in row chunks instead of being listed as pairs, and
candidates are verified VERIFY_BATCH at a time, so memory stays bounded whatever the data.

Cost: on spread hashes (random 1024-bit ones) a 16-bit block matches by chance for one pair in
65,536, so candidates stay near 65 n^2 / 2^17. Hashes of one document layout agree far more
often: 52% of the distinct real pairs share some block, and hashes drawn with the real bits'
shares of ones give 0.7 candidates per pair. Verifying a candidate costs about CANDIDATE_COST
distances of the all-pairs comparison (gathers against streaming), so where the buckets promise
more candidates than that pays for, the search compares all pairs instead, in row chunks:
still exact and bounded in memory, but quadratic in time (docs/benchmarks.md, "Scaling").
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

LARGE_BUCKET = 2048
"""Buckets above this size are compared densely (chunked) instead of listed as pairs."""
VERIFY_BATCH = 1 << 20
"""Candidate pairs verified at once: about 40 MiB of index and distance arrays."""
DENSE_CELLS = 1 << 22
"""Distances computed at once in a dense comparison: 32 MiB of uint64 temporaries."""
MIN_BLOCK_BITS = 8
"""Blocks narrower than this match too often to prune anything: search densely instead."""
CANDIDATE_COST = 4
"""Seconds to verify one candidate pair / seconds per distance of the dense comparison
(measured: 440 ns against 110 ns per pair on 1024-bit hashes, 2 shared cores)."""


def near_pairs_packed(matrix: np.ndarray, threshold: int) -> list[tuple[int, int]]:
    """Index pairs (i < j), in row-major order, of rows of a packed hash matrix (n, bytes)
    whose Hamming distance is at most `threshold`."""
    n = len(matrix)
    if n < 2 or threshold < 0:
        return []
    words = pack_words(matrix)
    n_blocks = threshold + 1
    buckets = [] if matrix.shape[1] * 8 < MIN_BLOCK_BITS * n_blocks else index_blocks(matrix, n_blocks)
    if not buckets or candidate_count(buckets) * CANDIDATE_COST > n * (n - 1) // 2:
        codes = [dense_pair_codes(words, np.arange(n), threshold)]
    else:
        codes = list(verified_pair_codes(words, buckets, threshold))
    found = np.unique(np.concatenate(codes)) if codes else np.zeros(0, dtype=np.int64)
    i, j = np.divmod(found, n)
    return list(zip(i.tolist(), j.tolist()))


def pack_words(matrix: np.ndarray) -> np.ndarray:
    """(n, bytes) uint8 -> (words, n) uint64, word-major so one word of many rows is contiguous;
    zero padding to a whole word changes no distance."""
    n, width = matrix.shape
    padded = np.zeros((n, -(-width // 8) * 8), dtype=np.uint8)
    padded[:, :width] = matrix
    return np.ascontiguousarray(padded.view(np.uint64).T)


def plan_blocks(shares: np.ndarray, n_blocks: int) -> list[np.ndarray]:
    """Bit indices of each block, given each bit's share of ones: bits sorted by how often
    pairs differ on them, dealt in snake order, so no block is made of bits every hash shares."""
    order = np.argsort(-(shares * (1.0 - shares)), kind="stable")
    rounds, column = np.divmod(np.arange(len(order)), n_blocks)
    block_of = np.where(rounds % 2 == 0, column, n_blocks - 1 - column)
    return [np.sort(order[block_of == b]) for b in range(n_blocks)]


def block_keys(bit_rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """One sortable key per hash: the value of the block made of bits `columns`, read from the
    bit-major (bits, n) array so that a block's bits are contiguous rows."""
    packed = np.ascontiguousarray(np.packbits(bit_rows[columns], axis=0).T)
    if packed.shape[1] <= 8:
        wide = np.zeros((len(packed), 8), dtype=np.uint8)
        wide[:, : packed.shape[1]] = packed
        return wide.view(np.uint64).ravel()
    rows = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    return np.unique(rows, return_inverse=True)[1].ravel()


def bucket_runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by key, and the start and size of each run of equal keys of size >= 2."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    shared = sizes >= 2
    return order, starts[shared], sizes[shared]


def index_blocks(matrix: np.ndarray, n_blocks: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The buckets of every block: rows sorted by block value, start and size of shared runs."""
    bit_rows = np.ascontiguousarray(np.unpackbits(matrix, axis=1).T)
    shares = bit_rows.mean(axis=1, dtype=np.float64)
    return [bucket_runs(block_keys(bit_rows, columns)) for columns in plan_blocks(shares, n_blocks)]


def candidate_count(buckets: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> int:
    """Pairs the buckets propose, repeats across blocks included: the verification work."""
    return sum(int(np.sum(sizes * (sizes - 1) // 2)) for _, _, sizes in buckets)


def verified_pair_codes(words: np.ndarray, buckets, threshold: int) -> Iterator[np.ndarray]:
    """Codes i * n + j of verified pairs, block by block (a pair may come from several blocks)."""
    n = words.shape[1]
    for order, starts, sizes in buckets:
        large = sizes > LARGE_BUCKET
        for start, size in zip(starts[large], sizes[large]):
            yield dense_pair_codes(words, order[start : start + size], threshold)
        for left, right in run_pairs(order, starts[~large], sizes[~large]):
            keep = pair_distances(words, left, right) <= threshold
            yield np.minimum(left, right)[keep] * n + np.maximum(left, right)[keep]


def run_pairs(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All pairs of rows within each run, as (left, right) index arrays of about VERIFY_BATCH."""
    counts = sizes * (sizes - 1) // 2
    batch_of = np.cumsum(counts) // VERIFY_BATCH
    for batch in np.unique(batch_of):
        chosen = batch_of == batch
        yield pairs_within_runs(order, starts[chosen], sizes[chosen])


def pairs_within_runs(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (a, b), a before b, inside each run of `order`, without a Python loop per run."""
    first = np.repeat(starts, sizes)
    offsets = np.arange(len(first)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    followers = np.repeat(sizes, sizes) - 1 - offsets
    left = np.repeat(first + offsets, followers)
    steps = np.arange(len(left)) - np.repeat(np.cumsum(followers) - followers, followers) + 1
    return order[left], order[left + steps]


def pair_distances(words: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Hamming distance of each (left[k], right[k]) pair, one word at a time (small temporaries)."""
    distances = np.zeros(len(left), dtype=np.uint16)
    for word in words:
        distances += np.bitwise_count(word[left] ^ word[right])
    return distances


def dense_pair_codes(words: np.ndarray, members: np.ndarray, threshold: int) -> np.ndarray:
    """Codes of the pairs within `members` at distance <= threshold, all against all, in row
    chunks of at most DENSE_CELLS distances."""
    n = words.shape[1]
    rows = max(1, DENSE_CELLS // max(1, len(members)))
    found = []
    for start in range(0, len(members), rows):
        left, right = members[start : start + rows], members[start:]
        distances = np.zeros((len(left), len(right)), dtype=np.uint16)
        for word in words:
            distances += np.bitwise_count(word[left][:, None] ^ word[right][None, :])
        a, b = np.nonzero(distances <= threshold)
        ahead = b > a  # right starts at the chunk's first row: keep each pair once
        i, j = left[a[ahead]], right[b[ahead]]
        found.append(np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j))
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
