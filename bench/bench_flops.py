"""Benchmark: how well a train step uses this CPU, and where its time goes.

Measures, on random data of the model's input size:

1. The CPU's practical peak: a plain 3x3 convolution (32x32x64 -> 64, batch 32: the shape of
   imgclf-cnn's middle blocks) forward and backward, in float32 and bfloat16.
2. Each model's training throughput (images/s through ``fit``, augmentation included) and its
   useful FLOP/s: forward FLOPs per image (counted from the layers: convolutions and dense
   layers, 2 per multiply-add) x 3 (forward + the two backward products) x images/s, as a share
   of the convolution peak in the same precision.
3. With ``--layers``: forward+backward time of each layer on its own input shape, the slowest
   first (a per-layer profile; the remainder is the optimizer and Keras' step overhead).
4. With ``--fixed-costs DATA_DIR``: the fixed costs of ``imgclf train`` on a real dataset:
   importing TensorFlow, scanning the folder, the first epoch (decoding and tracing) against a
   steady epoch.

Usage:
    python bench/bench_flops.py                          # imgclf-cnn and the tutorial CNN
    python bench/bench_flops.py --precision mixed_bfloat16 --layers
    python bench/bench_flops.py --fixed-costs ../shared/datasets/flowers128

Not a unit test: figures depend on the machine (and on anything else running on it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import tutorial_model  # noqa: E402 (after the path set-up; the tutorial CNN, defined once)

PEAK_SHAPE = (32, 32, 32, 64)  # batch, height, width, channels in (= channels out)


def conv_peak(precision: str, repeats: int = 30) -> float:
    """FLOP/s of a plain 3x3 convolution's forward and backward pass (the practical peak)."""
    import tensorflow as tf

    dtype = tf.bfloat16 if "bfloat16" in precision else tf.float32
    batch, height, width, channels = PEAK_SHAPE
    images = tf.random.normal(PEAK_SHAPE, dtype=dtype)
    kernel = tf.Variable(tf.random.normal((3, 3, channels, channels), dtype=dtype) * 0.05)

    @tf.function
    def step(x: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
            loss = tf.reduce_sum(tf.cast(y, tf.float32))
        grad_x, grad_k = tape.gradient(loss, [x, kernel])
        return tf.reduce_sum(tf.cast(grad_x, tf.float32)) + tf.reduce_sum(tf.cast(grad_k, tf.float32))

    for _ in range(3):
        step(images)
    started = time.perf_counter()
    for _ in range(repeats):
        step(images).numpy()
    seconds = (time.perf_counter() - started) / repeats
    flops = 3 * 2 * batch * height * width * 9 * channels * channels
    return flops / seconds


def forward_flops(model) -> int:  # type: ignore[no-untyped-def]
    """Forward FLOPs per image of the convolutions and dense layers (2 per multiply-add)."""
    from keras import layers

    total = 0
    for layer in model.layers:
        if isinstance(layer, (layers.Conv2D, layers.SeparableConv2D, layers.DepthwiseConv2D, layers.Dense)):
            out_shape = layer.output.shape
            in_channels = layer.input.shape[-1]
            positions = 1
            for dim in out_shape[1:-1]:
                positions *= dim
            out_channels = out_shape[-1]
            if isinstance(layer, layers.SeparableConv2D):
                kh, kw = layer.kernel_size
                total += 2 * positions * kh * kw * in_channels + 2 * positions * in_channels * out_channels
            elif isinstance(layer, layers.DepthwiseConv2D):
                kh, kw = layer.kernel_size
                total += 2 * positions * kh * kw * out_channels
            elif isinstance(layer, layers.Conv2D):
                kh, kw = layer.kernel_size
                total += 2 * positions * kh * kw * in_channels * out_channels
            else:
                total += 2 * positions * in_channels * out_channels
        elif hasattr(layer, "layers"):
            total += forward_flops(layer)
    return total


def imgclf_model(size: int, overrides: list[str]):  # type: ignore[no-untyped-def]
    from imgclf_cli.config import resolve_config
    from imgclf_cli.models import build_model

    config = resolve_config(None, [f"data.image_size={size}", *overrides])
    return build_model(config, 5), config


def train_throughput(model, size: int, batch: int, steps: int = 40, adam: bool = False) -> float:  # type: ignore[no-untyped-def]
    """Images/s through ``fit`` on random images held in memory (after a warm-up epoch)."""
    import keras
    import numpy as np
    import tensorflow as tf

    count = batch * steps
    images = np.random.default_rng(0).uniform(0, 255, (count, size, size, 3)).astype("float32")
    labels = np.random.default_rng(1).integers(0, 5, count)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch).cache().prefetch(2)
    optimizer = keras.optimizers.Adam() if adam else keras.optimizers.AdamW(1e-3)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=adam))
    model.fit(data, epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(data, epochs=2, verbose=0)
    return 2 * count / (time.perf_counter() - started)


def layer_profile(model, batch: int, repeats: int = 10) -> list[tuple[str, float]]:  # type: ignore[no-untyped-def]
    """Forward+backward seconds per batch of each layer with weights or real work, alone."""
    import tensorflow as tf
    from keras import layers

    timings = []
    skip = (layers.InputLayer,)
    for layer in model.layers:
        if isinstance(layer, skip) or isinstance(layer.input, list):
            continue
        shape = (batch, *layer.input.shape[1:])
        if None in shape:
            continue
        x = tf.random.uniform(shape, dtype=layer.compute_dtype or "float32")

        @tf.function
        def step(x: tf.Tensor, layer=layer) -> tf.Tensor:  # type: ignore[no-untyped-def]
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.cast(y, tf.float32))
            grads = tape.gradient(loss, [x, *layer.trainable_weights])
            return tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads if g is not None])

        step(x)
        started = time.perf_counter()
        for _ in range(repeats):
            step(x).numpy()
        timings.append(
            (
                f"{layer.name} ({type(layer).__name__}, {tuple(shape[1:])})",
                (time.perf_counter() - started) / repeats,
            )
        )
    return sorted(timings, key=lambda item: -item[1])


def fixed_costs(data_dir: Path, overrides: list[str]) -> None:
    started = time.perf_counter()
    import tensorflow  # noqa: F401

    imported = time.perf_counter() - started
    from imgclf_cli.dataset import scan_dataset
    from imgclf_cli.store import read_history
    from imgclf_cli.training import train

    scan_started = time.perf_counter()
    scan_dataset(data_dir)
    scanned = time.perf_counter() - scan_started
    with tempfile.TemporaryDirectory() as runs:
        result = train(data_dir, runs_dir=runs, overrides=["train.epochs=3", *overrides])
        rows = read_history(Path(result.run_dir))
    epochs = [float(row["seconds"]) for row in rows]
    print(f"import tensorflow            {imported:6.2f} s")
    print(f"scan {data_dir.name:22s} {scanned:6.2f} s")
    print(f"first epoch                 {epochs[0]:6.2f} s  (decoding every image, tracing the step)")
    print(f"steady epoch                {min(epochs[1:]):6.2f} s")
    print(f"first-epoch extra           {epochs[0] - min(epochs[1:]):6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=128, help="imgclf-cnn input size (default 128)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="float32", help="float32 or mixed_bfloat16")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="imgclf config override")
    parser.add_argument("--layers", action="store_true", help="per-layer forward+backward times")
    parser.add_argument("--fixed-costs", type=Path, metavar="DATA_DIR")
    args = parser.parse_args()

    if args.fixed_costs:
        fixed_costs(args.fixed_costs, args.overrides)
        return
    import keras

    keras.mixed_precision.set_global_policy(args.precision)
    peak = conv_peak(args.precision)
    print(f"3x3 conv {PEAK_SHAPE} fwd+bwd, {args.precision}: {peak / 1e9:.1f} GFLOP/s (peak)")
    keras.mixed_precision.set_global_policy("float32")
    tutorial = tutorial_model(5)
    rows = [("tutorial CNN 180px float32", tutorial, 180, True, conv_peak("float32"))]
    keras.mixed_precision.set_global_policy(args.precision)
    model, _ = imgclf_model(args.size, args.overrides)
    rows.append((f"imgclf-cnn {args.size}px {args.precision}", model, args.size, False, peak))
    print(f"{'model':34s} {'GFLOPs/img':>10s} {'img/s':>7s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for label, net, size, is_tutorial, its_peak in rows:
        flops = forward_flops(net)
        if is_tutorial:
            keras.mixed_precision.set_global_policy("float32")
        speed = train_throughput(net, size, args.batch, adam=is_tutorial)
        keras.mixed_precision.set_global_policy(args.precision)
        useful = 3 * flops * speed
        print(f"{label:34s} {flops / 1e9:10.3f} {speed:7.0f} {useful / 1e9:8.1f} {useful / its_peak:8.0%}")
    if args.layers:
        profile = layer_profile(model, args.batch)
        total = sum(seconds for _, seconds in profile)
        print(f"\nimgclf-cnn layers, forward+backward per batch of {args.batch} (sum {total * 1000:.0f} ms):")
        for name, seconds in profile[:15]:
            print(f"  {seconds * 1000:7.2f} ms  {seconds / total:5.1%}  {name}")


if __name__ == "__main__":
    main()
