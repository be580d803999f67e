"""The names of the models ``imgclf train`` can build, checked without importing Keras.

The config is validated (and ``--print-config`` run) before TensorFlow loads, so the names live
here; ``imgclf_cli.models`` maps each backbone name to its ``keras.applications`` architecture.
"""

from __future__ import annotations

from imgclf_cli.errors import ConfigError, closest, did_you_mean

DEFAULT_MODEL = "imgclf-cnn"
BACKBONE_NAMES = (
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "mobilenet_v2",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_v2_b0",
    "efficientnet_v2_s",
    "resnet50",
    "resnet50_v2",
    "convnext_tiny",
    "densenet121",
    "xception",
)
MODEL_NAMES = (DEFAULT_MODEL, *BACKBONE_NAMES)
ALL_MODELS_HINT = "imgclf train --help lists every model"


def squashed(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def canonical_model_name(name: str) -> str:
    """``MobileNetV3Small``, ``mobilenet-v3-small`` and ``mobilenet_v3_small`` are one model.

    Keras' class names (``ResNet50V2``) squash to the same letters as these names, so they are
    accepted too. An unknown name is a ``ConfigError`` that suggests the closest names.
    """
    for known in MODEL_NAMES:
        if squashed(known) == squashed(name):
            return known
    message = did_you_mean(f"Unknown model {name!r}", closest(name.lower(), MODEL_NAMES))
    raise ConfigError(message, ALL_MODELS_HINT)
