"""tf.data input pipelines: parallel decoding, caching, shuffling, batching, prefetching.  [heavy]

Images are decoded by ``imgclf_cli.images.load_image`` (Pillow) inside ``tf.numpy_function``,
so training sees exactly what prediction and export verification see. Decoded, resized images
are cached after the first epoch: in memory when they fit, otherwise in a file on disk, so
datasets larger than RAM train with bounded memory. Files that fail to decode are dropped from
the stream and recorded in a ``DecodeFailures`` log instead of stopping training.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from imgclf_cli.dataset import Sample, SkippedFile
from imgclf_cli.images import UnreadableImage, load_image
from imgclf_cli.resources import available_memory_bytes, default_threads

# Decoded images held in memory may use at most this share of the available RAM.
MEMORY_CACHE_SHARE = 0.3
# Upper bound for the shuffle buffer of disk-cached datasets, in bytes.
SHUFFLE_BUFFER_BYTES = 512 * 1024 * 1024
# Batches prepared ahead of the one the model is working on.
PREFETCH_BATCHES = 2


class DecodeFailures:
    """Files that failed to decode inside the pipeline (thread-safe, each file once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}

    def add(self, path: str, reason: str) -> None:
        with self._lock:
            self._entries.setdefault(path, reason)

    def entries(self) -> list[SkippedFile]:
        with self._lock:
            return [SkippedFile(path, reason) for path, reason in sorted(self._entries.items())]


def cache_fits_in_memory(num_images: int, image_size: tuple[int, int]) -> bool:
    needed = num_images * image_size[0] * image_size[1] * 3
    return needed <= MEMORY_CACHE_SHARE * available_memory_bytes()


def make_dataset(
    samples: Sequence[Sample],
    *,
    image_size: tuple[int, int],
    batch_size: int,
    num_classes: int,
    training: bool,
    seed: int,
    failures: DecodeFailures,
    cache: str = "auto",
    cache_dir: Path | None = None,
    cache_name: str = "data",
    one_hot: bool = True,
    drop_remainder: bool = False,
    skip_batches: int = 0,
) -> tf.data.Dataset:
    """Batches of ``(uint8 images, labels)``; the model rescales and augments them itself.

    ``cache``: ``memory``, ``disk`` (needs ``cache_dir``), ``none`` or ``auto``.
    Training datasets (``training=True``) reshuffle and repeat forever in full batches: the
    caller gives ``fit`` a number of steps per epoch; ``skip_batches`` starts the stream where
    an earlier one stopped (a resumed run continues in the same order). Evaluation datasets keep the order of
    ``samples`` and end after one pass.
    """
    height, width = image_size
    paths = [sample.path for sample in samples]
    labels = np.asarray([sample.label for sample in samples], dtype=np.int32)

    def decode(path_bytes: bytes) -> tuple[np.ndarray, np.bool_]:
        path = path_bytes.decode("utf-8") if isinstance(path_bytes, bytes) else str(path_bytes)
        try:
            return load_image(path, image_size), np.bool_(True)
        except UnreadableImage as error:
            failures.add(path, error.reason)
            return np.zeros((height, width, 3), np.uint8), np.bool_(False)

    def decode_element(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        image, ok = tf.numpy_function(decode, [path], [tf.uint8, tf.bool], stateful=False)
        image.set_shape((height, width, 3))
        ok.set_shape(())
        return image, label, ok

    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    if training:
        # Shuffle file names first: cheap, and it decorrelates classes before a bounded buffer.
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=False)
    dataset = dataset.map(decode_element, num_parallel_calls=default_threads(), deterministic=True)
    dataset = dataset.filter(lambda image, label, ok: ok)
    dataset = dataset.map(lambda image, label, ok: (image, label))

    if cache == "auto":
        cache = (
            "memory" if cache_fits_in_memory(len(paths), image_size) else ("disk" if cache_dir else "none")
        )
    if cache == "memory":
        dataset = dataset.cache()
    elif cache == "disk" and cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        dataset = dataset.cache(str(cache_dir / cache_name))

    if training:
        image_bytes = height * width * 3
        buffer = (
            len(paths)
            if cache == "memory"
            else max(256, min(len(paths), SHUFFLE_BUFFER_BYTES // image_bytes))
        )
        dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        # An endless stream of full batches: Keras keeps one iterator for the whole fit rather
        # than one per epoch, and a single batch shape means a single trace of the train step.
        # (repeat() of a stream with no decodable image ends instead of spinning.)
        dataset = dataset.repeat()
        # The order is fixed by the seed alone, so skipping the images already trained on puts
        # a resumed stream exactly where the interrupted one was (batch boundaries included).
        if skip_batches:
            dataset = dataset.skip(skip_batches * batch_size)
        drop_remainder = True
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if one_hot:
        dataset = dataset.map(lambda images, batch_labels: (images, tf.one_hot(batch_labels, num_classes)))
    dataset = dataset.prefetch(PREFETCH_BATCHES)
    # No tf.data autotuner: destroying an iterator whose autotuner thread had been running for
    # a while blocked for 2 s (a validation pass) to 40 s (a whole fit) in TF 2.21 on 2 cores.
    # Fixed settings (one decode thread per core, two batches ahead) are what it chose anyway.
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)
