"""Finding exact and near duplicates among a dataset's images.

Exact duplicates share a content hash (SHA-256 of the file's bytes). Near duplicates have
perceptual hashes (64-bit pHash) at most a few bits apart: re-encoded, resized or recoloured
copies of one photo. The search for close hashes is banded (see ``band_layout``), so it does not
compare every pair of images. Groups are sorted by kind: within one class, across classes (a
label conflict) or across splits (leakage).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from imgclf_cli.images import to_rgb
from imgclf_cli.inspection_report import DuplicateGroups, ImageRecord

# The 32x32 DCT-II basis (orthonormal): pHash keeps the lowest 8x8 frequencies.
_HASH_SIDE = 32
_frequencies = np.arange(_HASH_SIDE)
_DCT_MATRIX = np.sqrt(2.0 / _HASH_SIDE) * np.cos(
    np.pi * (2 * _frequencies[None, :] + 1) * _frequencies[:, None] / (2 * _HASH_SIDE)
)
_DCT_MATRIX[0] /= np.sqrt(2.0)
_LOW_FREQUENCY_BASIS = np.ascontiguousarray(_DCT_MATRIX[:8], dtype=np.float32)


def perceptual_hash_of(image: Image.Image) -> int:
    """A 64-bit pHash: the lowest 8x8 DCT frequencies of a 32x32 grayscale thumbnail, each
    compared with their median. Robust to re-encoding, resizing and small colour changes."""
    gray = image if image.mode == "L" else to_rgb(image).convert("L")
    pixels = np.asarray(
        gray.resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0), dtype=np.float32
    )
    frequencies = (_LOW_FREQUENCY_BASIS @ pixels @ _LOW_FREQUENCY_BASIS.T).ravel()
    # The DC term (overall brightness) is left out of the median, as in the usual pHash; the
    # median of those 63 values is the 32nd smallest (partition is much cheaper than median).
    median = np.partition(frequencies[1:], 31)[31]
    return int.from_bytes(np.packbits(frequencies > median).tobytes(), "big")


_POPCOUNT_TABLE = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


def hamming_distances(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Bitwise distance between two broadcastable ``uint64`` arrays."""
    difference = np.bitwise_xor(first, second)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(difference)
    bytes_view = difference.view(np.uint8).reshape(*difference.shape, 8)
    return _POPCOUNT_TABLE[bytes_view].sum(axis=-1)


def band_layout(max_distance: int) -> list[tuple[int, int]]:
    """Split 64 bits into ``max_distance + 1`` bands of (shift, width).

    Two hashes at most ``max_distance`` bits apart agree exactly on at least one band
    (pigeonhole), so only hashes sharing a band value need comparing: no all-pairs scan.
    """
    num_bands = max_distance + 1
    widths = [64 // num_bands + (1 if index < 64 % num_bands else 0) for index in range(num_bands)]
    layout = []
    shift = 0
    for width in widths:
        layout.append((shift, width))
        shift += width
    return layout


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int, block_rows: int = 1024) -> np.ndarray:
    """Index pairs ``(i, j)``, ``i < j``, of ``uint64`` hashes at most ``max_distance`` bits apart.

    Sorted by ``(i, j)``. Within each band, only hashes with the same band value are compared.
    """
    num_hashes = len(hashes)
    band_keys = np.stack(
        [
            (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            for shift, width in band_layout(max_distance)
        ]
    )
    found: list[np.ndarray] = []
    for band, keys in enumerate(band_keys):
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], num_hashes]
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            if end - start < 2:
                continue
            members = np.sort(order[start:end])
            member_hashes = hashes[members]
            for row_start in range(0, len(members), block_rows):
                rows = member_hashes[row_start : row_start + block_rows]
                close = hamming_distances(rows[:, None], member_hashes[None, :]) <= max_distance
                row_index, column_index = np.nonzero(close)
                row_index += row_start
                upper = column_index > row_index
                first, second = members[row_index[upper]], members[column_index[upper]]
                # A pair that also agrees on an earlier band was already found there.
                if band:
                    new = np.all(band_keys[:band, first] != band_keys[:band, second], axis=0)
                    first, second = first[new], second[new]
                found.append(first.astype(np.int64) * num_hashes + second)
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    encoded = np.sort(np.concatenate(found))
    return np.stack([encoded // num_hashes, encoded % num_hashes], axis=1)


def connected_groups(num_items: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (of two or more items) of the graph given by ``pairs``."""
    parent = list(range(num_items))

    def find(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for first, second in pairs:
        root_first, root_second = find(first), find(second)
        if root_first != root_second:
            parent[max(root_first, root_second)] = min(root_first, root_second)
    components: dict[int, list[int]] = defaultdict(list)
    for item in range(num_items):
        components[find(item)].append(item)
    return [members for members in components.values() if len(members) > 1]


def classify_groups(groups: Iterable[Sequence[ImageRecord]]) -> DuplicateGroups:
    result = DuplicateGroups()
    for members in groups:
        paths = sorted(image.path for image in members)
        cross_class = len({image.class_name for image in members}) > 1
        cross_split = len({image.split for image in members}) > 1
        if cross_class:
            result.cross_class.append(paths)
        if cross_split:
            result.cross_split.append(paths)
        if not cross_class and not cross_split:
            result.within_class.append(paths)
    for groups_list in (result.within_class, result.cross_class, result.cross_split):
        groups_list.sort()
    return result


def group_exact_duplicates(images: Sequence[ImageRecord]) -> DuplicateGroups:
    """Files with byte-identical content (same SHA-256)."""
    by_hash: dict[str, list[ImageRecord]] = defaultdict(list)
    for image in images:
        by_hash[image.content_hash].append(image)
    return classify_groups(members for members in by_hash.values() if len(members) > 1)


def group_near_duplicates(images: Sequence[ImageRecord], max_distance: int) -> DuplicateGroups:
    """Groups of different files whose perceptual hashes are at most ``max_distance`` apart.

    Byte-identical copies are compared once and a group is only reported when it holds at least
    two different contents, so exact duplicates are not reported again as near duplicates.
    """
    copies: dict[str, list[ImageRecord]] = defaultdict(list)
    for image in images:
        if image.perceptual_hash is not None:
            copies[image.content_hash].append(image)
    contents = list(copies)
    if len(contents) < 2:
        return DuplicateGroups()
    hashes = np.array([copies[content][0].perceptual_hash for content in contents], dtype=np.uint64)
    pairs = near_duplicate_pairs(hashes, max_distance)
    groups = connected_groups(len(contents), ((int(first), int(second)) for first, second in pairs))
    return classify_groups(
        [image for index in group for image in copies[contents[index]]] for group in groups
    )
