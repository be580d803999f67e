"""Model architectures, with preprocessing and augmentation inside the model.  [heavy]

Every model takes RGB images as floats in 0..255 (any height and width: a ``Resizing`` layer
brings them to the trained size), rescales them as its backbone expects, augments them during
training only, and outputs class probabilities. So prediction and export never re-implement
preprocessing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers

from imgclf_cli.config import AugmentConfig, Config
from imgclf_cli.errors import ModelError
from imgclf_cli.model_names import DEFAULT_MODEL, canonical_model_name


@keras.saving.register_keras_serializable(package="imgclf")
class ReverseChannels(layers.Layer):
    """RGB -> BGR, for backbones trained with Caffe-style inputs (ResNet50)."""

    def call(self, inputs):  # type: ignore[no-untyped-def]
        return inputs[..., ::-1]

    def compute_output_shape(self, input_shape):  # type: ignore[no-untyped-def]
        return input_shape


@keras.saving.register_keras_serializable(package="imgclf")
class RandomAffine(layers.Layer):
    """Random flips, rotation, zoom and translation as one affine warp, in training only.

    Keras' RandomFlip/RandomRotation/RandomZoom/RandomTranslation warp the batch once each;
    one combined warp gives the same distribution of images for a third of the cost (about
    12 ms instead of 41 ms per batch of 32 at 128 px on a CPU, ~10% of a training step).
    At inference it returns its input untouched, so exported models hold no trace of it.
    """

    def __init__(
        self,
        horizontal_flip: bool = True,
        vertical_flip: bool = False,
        rotation: float = 0.0,
        zoom: float = 0.0,
        translation: float = 0.0,
        seed: int | None = None,
        **kwargs,  # type: ignore[no-untyped-def]
    ) -> None:
        super().__init__(**kwargs)
        self.horizontal_flip = horizontal_flip
        self.vertical_flip = vertical_flip
        self.rotation = rotation  # fraction of a full turn, either way
        self.zoom = zoom  # relative scale change, either way (positive: zoom out)
        self.translation = translation  # fraction of the image size, either way
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):  # type: ignore[no-untyped-def]
        if not training:
            return inputs
        ops = keras.ops
        batch = ops.shape(inputs)[0]
        height = ops.cast(ops.shape(inputs)[1], "float32")
        width = ops.cast(ops.shape(inputs)[2], "float32")

        def uniform(bound: float):  # type: ignore[no-untyped-def]
            return keras.random.uniform((batch,), -bound, bound, seed=self.seed_generator)

        def flip_sign(enabled: bool):  # type: ignore[no-untyped-def]
            if not enabled:
                return ops.ones((batch,))
            return ops.where(keras.random.uniform((batch,), seed=self.seed_generator) < 0.5, -1.0, 1.0)

        angle = uniform(self.rotation * 2.0 * math.pi)
        scale = 1.0 + uniform(self.zoom)
        flip_x, flip_y = flip_sign(self.horizontal_flip), flip_sign(self.vertical_flip)
        shift_x, shift_y = uniform(self.translation) * width, uniform(self.translation) * height
        cos, sin = ops.cos(angle) * scale, ops.sin(angle) * scale
        # Output pixel p samples the input at C + scale * R(angle) * F * (p - C) + shift.
        m00, m01, m10, m11 = cos * flip_x, -sin * flip_y, sin * flip_x, cos * flip_y
        center_x, center_y = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        offset_x = center_x - m00 * center_x - m01 * center_y + shift_x
        offset_y = center_y - m10 * center_x - m11 * center_y + shift_y
        zeros = ops.zeros((batch,))
        transform = ops.stack([m00, m01, offset_x, m10, m11, offset_y, zeros, zeros], axis=1)
        return ops.image.affine_transform(inputs, transform, interpolation="bilinear", fill_mode="reflect")

    def compute_output_shape(self, input_shape):  # type: ignore[no-untyped-def]
        return input_shape

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "horizontal_flip": self.horizontal_flip,
            "vertical_flip": self.vertical_flip,
            "rotation": self.rotation,
            "zoom": self.zoom,
            "translation": self.translation,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Backbone:
    constructor: str  # attribute of keras.applications
    preprocessing: str  # builtin | tf | torch | caffe
    extra_kwargs: tuple[tuple[str, object], ...] = ()


# Keyed by imgclf_cli.model_names.BACKBONE_NAMES (the names the config accepts without Keras).
BACKBONES: dict[str, Backbone] = {
    "mobilenet_v3_small": Backbone("MobileNetV3Small", "builtin", (("include_preprocessing", True),)),
    "mobilenet_v3_large": Backbone("MobileNetV3Large", "builtin", (("include_preprocessing", True),)),
    "mobilenet_v2": Backbone("MobileNetV2", "tf"),
    "efficientnet_b0": Backbone("EfficientNetB0", "builtin"),
    "efficientnet_b1": Backbone("EfficientNetB1", "builtin"),
    "efficientnet_b2": Backbone("EfficientNetB2", "builtin"),
    "efficientnet_b3": Backbone("EfficientNetB3", "builtin"),
    "efficientnet_v2_b0": Backbone("EfficientNetV2B0", "builtin", (("include_preprocessing", True),)),
    "efficientnet_v2_s": Backbone("EfficientNetV2S", "builtin", (("include_preprocessing", True),)),
    "resnet50": Backbone("ResNet50", "caffe"),
    "resnet50_v2": Backbone("ResNet50V2", "tf"),
    "convnext_tiny": Backbone("ConvNeXtTiny", "builtin", (("include_preprocessing", True),)),
    "densenet121": Backbone("DenseNet121", "torch"),
    "xception": Backbone("Xception", "tf"),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def augmentation(config: AugmentConfig, seed: int) -> list[layers.Layer]:
    """Random transforms, active only in training (``model.fit``), identity at inference."""
    stack: list[layers.Layer] = []
    flips = config.horizontal_flip or config.vertical_flip
    if flips or max(config.rotation, config.zoom, config.translation) > 0:
        stack.append(
            RandomAffine(
                horizontal_flip=config.horizontal_flip,
                vertical_flip=config.vertical_flip,
                rotation=config.rotation,
                zoom=config.zoom,
                translation=config.translation,
                seed=seed,
                name="random_affine",
            )
        )
    if config.contrast > 0:
        stack.append(layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 4))
    return stack


# From this input size up, the stem is one 4x4 stride-4 convolution; below it, a 3x3 stride-2
# convolution, a 3x3 convolution and a max-pool (also a quarter of the size, with more detail).
# Measured: at 128 px the one-convolution stem trains 1.7x faster for the same accuracy per epoch;
# at 32 px (sample_data, 12 epochs) it lost 10 points and saved little time (bench/README.md).
PATCHIFY_STEM_MIN_SIZE = 96


def small_cnn_features(x: keras.KerasTensor, width: int, input_size: int = 128) -> keras.KerasTensor:
    """A compact residual CNN (depthwise-separable, BatchNorm) that trains fast on a CPU.

    Chosen by measurement (bench/README.md): for inputs of ``PATCHIFY_STEM_MIN_SIZE`` and up the
    stem is one 4x4 convolution with stride 4 ("patchify", as in ConvNeXt) instead of two 3x3
    convolutions and a max-pool. On a CPU the full-resolution stem was the costliest part of a
    step at 128 px (its convolution and two BatchNorms over 64x64 maps, ~30% of the time);
    without it an epoch takes ~0.6 of the time for the same accuracy per epoch.
    """
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(x)
    if input_size >= PATCHIFY_STEM_MIN_SIZE:
        x = layers.Conv2D(width, 4, strides=4, padding="same", use_bias=False, name="stem")(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.Activation("relu")(x)
    else:
        x = layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.Activation("relu")(x)
        x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    for index, filters in enumerate((width * 2, width * 4, width * 8)):
        shortcut = layers.Conv2D(filters, 1, strides=2, padding="same", use_bias=False)(x)
        shortcut = layers.BatchNormalization(momentum=0.9)(shortcut)
        for repeat in range(2):
            if repeat:
                x = layers.Activation("relu")(x)
            x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        x = layers.add([x, shortcut], name=f"block{index + 1}_add")
        x = layers.Activation("relu")(x)
    x = layers.SeparableConv2D(width * 8, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.Activation("relu")(x)
    return layers.GlobalAveragePooling2D()(x)


def backbone_preprocessing(x: keras.KerasTensor, kind: str) -> keras.KerasTensor:
    if kind == "builtin":
        return x
    if kind == "tf":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(x)
    if kind == "torch":
        x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
        return layers.Normalization(
            mean=IMAGENET_MEAN, variance=[s * s for s in IMAGENET_STD], name="imagenet_normalize"
        )(x)
    # caffe: BGR, mean subtracted, no scaling
    x = layers.Normalization(mean=(123.68, 116.779, 103.939), variance=(1.0, 1.0, 1.0), name="imagenet_mean")(
        x
    )
    return ReverseChannels(name="rgb_to_bgr")(x)


def resolve_weights(weights: str) -> str | None:
    if weights.lower() in ("none", "random", ""):
        return None
    if weights.lower() == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(
            f"Backbone weights file not found: {weights}",
            "use model.weights=imagenet, none, or the path of a .weights.h5 / .h5 file",
        )
    return str(path)


def build_backbone(name: str, config: Config) -> tuple[keras.Model, bool]:
    """The keras.applications backbone (no top, average pooled) and whether it is frozen."""
    spec = BACKBONES[name]
    weights = resolve_weights(config.model.weights)
    constructor = getattr(keras.applications, spec.constructor)
    height, width = config.image_size
    try:
        backbone = constructor(
            include_top=False,
            weights=weights,
            input_shape=(height, width, 3),
            pooling="avg",
            **dict(spec.extra_kwargs),
        )
    except Exception as error:  # download failures, shape mismatches, bad weight files
        if weights == "imagenet":
            raise ModelError(
                f"Could not load ImageNet weights for {name}: {str(error).splitlines()[0][:200]}",
                "check your network connection, or use --set model.weights=none or a local weights file",
            ) from None
        raise ModelError(f"Could not build {name} with weights {config.model.weights!r}: {error}") from None
    freeze = config.model.freeze_backbone
    frozen = (weights is not None) if freeze == "auto" else freeze == "true"
    backbone.trainable = not frozen
    if frozen and config.model.fine_tune_layers > 0:
        unfreeze_tail(backbone, config.model.fine_tune_layers)
    return backbone, frozen


def unfreeze_tail(backbone: keras.Model, count: int) -> None:
    """Train the backbone's last ``count`` layers, BatchNorm excepted."""
    tail = {id(layer) for layer in backbone.layers[-count:]}
    backbone.trainable = True  # sets every layer; the loop below narrows it to the tail
    for layer in backbone.layers:
        # BatchNorm statistics stay frozen (a small dataset would wreck them); a BatchNorm
        # layer that is not trainable also normalises with its moving statistics.
        layer.trainable = id(layer) in tail and not isinstance(layer, layers.BatchNormalization)


def sole_backbone(model: keras.Model) -> keras.Model | None:
    """The one nested model (the ``keras.applications`` backbone) in ``model``, or ``None``."""
    backbones = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return backbones[0] if len(backbones) == 1 else None


def build_model(config: Config, num_classes: int) -> keras.Model:
    """A classifier taking RGB floats in 0..255 and returning ``num_classes`` probabilities."""
    name = canonical_model_name(config.model.name)
    height, width = config.image_size
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = layers.Resizing(height, width, name="resize")(inputs)
    for layer in augmentation(config.augment, config.seed):
        x = layer(x)
    if name == DEFAULT_MODEL:
        x = small_cnn_features(x, config.model.width, min(height, width))
    else:
        backbone, frozen = build_backbone(name, config)
        x = backbone_preprocessing(x, BACKBONES[name].preprocessing)
        # A frozen backbone runs in inference mode so its BatchNorm statistics are kept.
        x = backbone(x, training=False) if frozen and config.model.fine_tune_layers == 0 else backbone(x)
    if config.model.dropout > 0:
        x = layers.Dropout(config.model.dropout, seed=config.seed)(x)
    x = layers.Dense(num_classes, name="logits")(x)
    # float32 output even under mixed precision, for a numerically stable softmax and loss.
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name.replace("-", "_"))


def load_model(path: str | Path, compile: bool = False) -> keras.Model:
    """Load a ``.keras`` model in safe mode (no pickled or lambda code is ever executed)."""
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as error:
        raise ModelError(f"Could not load model {path}: {str(error).splitlines()[0][:300]}") from None
