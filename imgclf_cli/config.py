"""The training configuration: typed dataclasses, YAML files, ``--set`` overrides, validation.

Precedence: defaults < YAML file (``--config``) < ``--set key=value`` < explicit flags.
Unknown keys and wrong values are usage errors (exit code 2) that name the key and the expected
type, and suggest the closest keys or choices. A run saves its config with every ``auto``
replaced by what the run decided (``Config.decided``).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from imgclf_cli.errors import ConfigError, UsageError, closest, did_you_mean
from imgclf_cli.model_names import DEFAULT_MODEL, canonical_model_name

ALL_KEYS_HINT = "imgclf train --print-config lists every key"


@dataclass
class DataConfig:
    image_size: Literal["auto"] | int | list[int] = "auto"
    """Input size: auto, one number (square) or [height, width]. auto: 224 for pretrained backbones; for imgclf-cnn the images' median short side, rounded up to a multiple of 16, between 32 and 128."""  # noqa: E501 (one line: it is the --print-config comment)
    batch_size: int = 32
    batch_per_replica: bool = False
    """false: batch_size is the global batch, split among the replicas (GPUs, workers); true: each replica's, so the global batch grows with them (scale the learning rate too: docs/distributed.md)."""  # noqa: E501 (one line: it is the --print-config comment)
    validation_split: float = 0.2
    """Fraction of each class held out for validation when the dataset has no val/ folder."""
    cache: Literal["auto", "memory", "disk", "none"] = "auto"
    """Where decoded, resized images are kept after the first epoch; auto = memory when they fit."""


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL
    """imgclf-cnn (from scratch, fast on a CPU) or a keras.applications backbone (see below)."""
    weights: str = "imagenet"
    """Backbone weights: imagenet, none (random) or a path to a .weights.h5 file."""
    freeze_backbone: Literal["auto", "true", "false"] = "auto"
    """auto: freeze pretrained backbones, train random ones."""
    fine_tune_layers: int = 0
    """With a frozen backbone, the number of its last layers to train anyway (BatchNorm stays frozen)."""
    dropout: float = 0.2
    width: int = 32
    """imgclf-cnn only: channels of the first block (doubled in each of the next blocks)."""


@dataclass
class AugmentConfig:
    horizontal_flip: bool = True
    vertical_flip: bool = False
    rotation: float = 0.05
    """Random rotation, as a fraction of a full turn."""
    zoom: float = 0.1
    translation: float = 0.1
    contrast: float = 0.0
    """Random contrast change (e.g. 0.1); off by default: its ~12% of a training step bought no accuracy in a fixed time (bench/README.md)."""  # noqa: E501 (one line: it is the --print-config comment)


@dataclass
class TrainConfig:
    epochs: int = 12
    """With train.time_budget, the most epochs when given (--epochs, --set or a config file)."""
    time_budget: str = "none"
    """none, or the wall time of the whole command (90s, 5m, 1.5h): the epochs and the learning-rate schedule are fitted to it."""  # noqa: E501 (one line: it is the --print-config comment)
    learning_rate: float = 0.002
    weight_decay: float = 0.0001
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr_schedule: Literal["cosine", "constant", "plateau"] = "cosine"
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    class_weights: Literal["none", "auto"] | dict[str, float] = "auto"
    """none, auto (inverse class frequency when classes are imbalanced) or {class: weight}."""
    early_stopping_patience: int = 8
    """Epochs without val_loss improvement before stopping (0 turns early stopping off); with train.time_budget only when given."""  # noqa: E501 (one line: it is the --print-config comment)
    mixed_precision: Literal["auto", "true", "false"] = "auto"
    """auto: float16 mixed precision when a GPU is present."""
    distribute: Literal["auto", "mirrored", "multi_worker", "none"] = "auto"
    """auto: multi_worker when TF_CONFIG names several workers (docs/distributed.md), else tf.distribute.MirroredStrategy when more than one GPU is present."""  # noqa: E501 (one line: it is the --print-config comment)
    cache_features: Literal["auto", "false"] = "auto"
    """auto: with a frozen pretrained backbone, compute its features once and train the head on them (then fine_tune_epochs on images when model.fine_tune_layers > 0); false: run the backbone every epoch."""  # noqa: E501 (one line: it is the --print-config comment)
    checkpoint_every: str = "epoch"
    """How often last.keras is saved: epoch (each epoch's end, and within an epoch at least every 10 minutes), <N>steps, or a duration (5m): what a crash can cost at most."""  # noqa: E501 (one line: it is the --print-config comment)
    fine_tune_epochs: int = 3
    """With cache_features auto and model.fine_tune_layers > 0: epochs that then train those layers on images, at a tenth of the learning rate (0: none)."""  # noqa: E501 (one line: it is the --print-config comment)
    tensorboard: bool = True
    """Write TensorBoard event files under <run>/tensorboard/ (per-epoch loss, accuracy, learning rate; evaluate adds its metrics and images): tensorboard --logdir runs/."""  # noqa: E501 (one line: it is the --print-config comment)
    mlflow: bool = False
    """Log the run to MLflow (needs pip install "imgclf[mlflow]"); also on when MLFLOW_TRACKING_URI is set."""  # noqa: E501 (one line: it is the --print-config comment)


@dataclass
class Config:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def decided(
        self,
        precision_policy: str,
        strategy: str,
        memory_cache_fits: bool,
        backbone_frozen: bool,
        class_weights: dict[int, float] | None,
        classes: list[str],
    ) -> Config:
        """A copy with each ``auto`` replaced by what the run decided: the run's config.yaml.

        The decisions are made where they always were and passed in as they came out: the Keras
        ``precision_policy`` and the tf.distribute ``strategy`` class name (``training_recipe``);
        whether the larger split's images fit in the memory cache (``pipeline``; when only the
        smaller one did, disk is recorded: a resume never holds more in memory than this run
        did); whether ``models.build_model`` froze the backbone; the ``class_weights`` by class
        index (``training_recipe.class_weights_for``), recorded by class name. imgclf-cnn loads
        no weights and has no backbone, so those settings are recorded as off. A resumed run
        reads the record back and trains the same way. ``train.cache_features`` stays ``auto``
        on a backbone: it has no value meaning "cache" (``fine_tuning`` plans on ``auto``).
        """
        recorded = copy.deepcopy(self)
        data, model, train = recorded.data, recorded.model, recorded.train
        model.name = canonical_model_name(model.name)
        scratch = model.name == DEFAULT_MODEL
        if scratch:
            model.weights = "none"
            if train.cache_features == "auto":
                train.cache_features = "false"
        if data.cache == "auto":
            data.cache = "memory" if memory_cache_fits else "disk"
        if model.freeze_backbone == "auto":
            model.freeze_backbone = "true" if backbone_frozen and not scratch else "false"
        if train.mixed_precision == "auto":
            train.mixed_precision = "false" if precision_policy == "float32" else "true"
        if train.distribute == "auto":
            # MultiWorkerMirroredStrategy's class is CollectiveAllReduceStrategy.
            decided = {"MirroredStrategy": "mirrored", "CollectiveAllReduceStrategy": "multi_worker"}
            train.distribute = decided.get(strategy, "none")
        if train.class_weights == "auto" and class_weights is None:
            train.class_weights = "none"
        elif train.class_weights == "auto" and class_weights is not None:
            train.class_weights = {classes[index]: weight for index, weight in class_weights.items()}
        return recorded

    @property
    def image_size(self) -> tuple[int, int]:
        """The resolved (height, width); ``auto`` must have been resolved (``resolve_image_size``)."""
        size = self.data.image_size
        if size == "auto":
            raise ValueError("data.image_size is still 'auto'; call resolve_image_size first")
        if isinstance(size, int):
            return (size, size)
        return (int(size[0]), int(size[1]))

    def resolve_image_size(self, median_short_side: int) -> None:
        """Replace ``auto`` by a concrete size chosen from the dataset and the model."""
        if self.data.image_size != "auto":
            return
        if self.model.name.lower().replace("-", "").replace("_", "") != DEFAULT_MODEL.replace("-", ""):
            self.data.image_size = 224
            return
        rounded = -(-max(median_short_side, 1) // 16) * 16
        self.data.image_size = min(128, max(32, rounded))


def all_keys(config_type: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key, e.g. ``train.epochs``."""
    keys = []
    for item in dataclasses.fields(config_type):
        hint = typing.get_type_hints(config_type)[item.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, f"{prefix}{item.name}."))  # type: ignore[arg-type]
        else:
            keys.append(f"{prefix}{item.name}")
    return keys


def unknown_key_error(key: str, where: str) -> ConfigError:
    """The error for an unknown ``key`` (found ``where``), suggesting the closest keys.

    Keys are compared by their last part (every one is unique), so a key in the wrong section
    (``train.batch_size``) or without one (``epochs``) finds its place, and the shared section
    prefix does not make every key of a section look close.
    """
    by_name = {dotted.rsplit(".", 1)[-1]: dotted for dotted in all_keys()}
    by_name.update({item.name: item.name for item in dataclasses.fields(Config)})
    names = [by_name[name] for name in closest(key.rsplit(".", 1)[-1], by_name) if by_name[name] != key]
    return ConfigError(did_you_mean(f"Unknown config key '{key}'{where}", names), ALL_KEYS_HINT)


def choices(hint: Any) -> list[str]:
    """The spelled-out choices (``Literal`` values) a type accepts, e.g. adamw, adam, sgd."""
    if typing.get_origin(hint) is Literal:
        return [str(value) for value in typing.get_args(hint)]
    if typing.get_origin(hint) in (Union, types.UnionType):
        return [choice for arg in typing.get_args(hint) for choice in choices(arg)]
    return []


def describe_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(str(value) for value in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(describe_type(arg) for arg in typing.get_args(hint))
    if origin is list:
        return f"list of {describe_type(typing.get_args(hint)[0])}"
    if origin is dict:
        key, value = typing.get_args(hint)
        return f"mapping {describe_type(key)} -> {describe_type(value)}"
    return getattr(hint, "__name__", str(hint))


def coerce(value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint`` when it is an acceptable spelling; ValueError otherwise."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        # YAML reads true/false/none as booleans and null; the choices are spelled as strings.
        if value is None or isinstance(value, bool):
            value = {True: "true", False: "false", None: "none"}[value]
        spelled = value
        if isinstance(spelled, str) and spelled.lower() in choices:
            return spelled.lower()
        raise ValueError
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return coerce(value, arg)
            except ValueError:
                continue
        raise ValueError
    if origin is list:
        if not isinstance(value, list):
            raise ValueError
        (item_hint,) = typing.get_args(hint)
        return [coerce(item, item_hint) for item in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError
        key_hint, value_hint = typing.get_args(hint)
        return {coerce(key, key_hint): coerce(item, value_hint) for key, item in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError
    if hint is str:
        if isinstance(value, str):
            return value
        if value is None:
            return "none"
        raise ValueError
    raise ValueError


def apply_values(target: Any, values: dict[str, Any], prefix: str = "", where: str = "") -> None:
    """Set fields of the dataclass ``target`` from a (nested) mapping, validating each.

    ``where`` names the source in messages, e.g. `` in c.yaml``.
    """
    hints = typing.get_type_hints(type(target))
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise unknown_key_error(dotted, where)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"Config key '{dotted}'{where} must be a mapping of its sub-keys, got {value!r}"
                )
            apply_values(getattr(target, key), value, f"{dotted}.", where)
            continue
        try:
            converted = coerce(value, hint)
        except ValueError:
            message = f"Config key '{dotted}'{where} expects {describe_type(hint)}, got {value!r}"
            if isinstance(value, str):
                message = did_you_mean(message, closest(value.lower(), choices(hint)))
            raise ConfigError(message) from None
        setattr(target, key, converted)


def validate(config: Config) -> None:
    """Range checks that types alone cannot express."""
    size = config.data.image_size
    if isinstance(size, list) and len(size) != 2:
        raise ConfigError(
            f"Config key 'data.image_size' expects auto, one number or [height, width], got {size!r}"
        )
    sides = [] if size == "auto" else ([size] if isinstance(size, int) else size)
    checks = [
        (all(8 <= side <= 4096 for side in sides), "data.image_size", "sizes between 8 and 4096"),
        (config.data.batch_size >= 1, "data.batch_size", "a positive integer"),
        (0.0 < config.data.validation_split < 1.0, "data.validation_split", "a fraction between 0 and 1"),
        (config.train.epochs >= 1, "train.epochs", "a positive integer"),
        (config.train.learning_rate > 0, "train.learning_rate", "a positive number"),
        (0.0 <= config.train.label_smoothing < 1.0, "train.label_smoothing", "a value in [0, 1)"),
        (0.0 <= config.model.dropout < 1.0, "model.dropout", "a value in [0, 1)"),
        (config.train.early_stopping_patience >= 0, "train.early_stopping_patience", "0 or more"),
        (config.train.warmup_epochs >= 0, "train.warmup_epochs", "0 or more"),
        (config.train.fine_tune_epochs >= 0, "train.fine_tune_epochs", "0 or more"),
        (
            valid_checkpoint_every(config.train.checkpoint_every),
            "train.checkpoint_every",
            "epoch, a number of steps (50steps) or a duration (5m)",
        ),
        (
            valid_time_budget(config.train.time_budget),
            "train.time_budget",
            "none or a duration: 90s, 5m, 1.5h",
        ),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"Config key '{key}' expects {expected}, got {lookup(config, key)!r}")
    canonical_model_name(config.model.name)


def valid_checkpoint_every(text: str) -> bool:
    from imgclf_cli.checkpointing import valid_checkpoint_every as valid

    return valid(str(text))


def valid_time_budget(text: str) -> bool:
    from imgclf_cli.time_budget import parse_duration

    if str(text).strip().lower() == "none":
        return True
    try:
        parse_duration(str(text))
    except ValueError:
        return False
    return True


def time_budget_seconds(config: Config) -> float | None:
    """``train.time_budget`` in seconds; ``None`` without a budget."""
    from imgclf_cli.time_budget import parse_duration

    text = str(config.train.time_budget).strip()
    return None if text.lower() == "none" else parse_duration(text)


def given_keys(
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> set[str]:
    """The dotted keys the user set (in the file, with ``--set`` or a flag), not left at default."""

    def flatten(values: dict[str, Any], prefix: str = "") -> set[str]:
        keys: set[str] = set()
        for key, value in values.items():
            dotted = f"{prefix}{key}"
            keys |= (
                flatten(value, f"{dotted}.")
                if isinstance(value, dict) and dotted != "train.class_weights"
                else {dotted}
            )
        return keys

    keys = flatten(load_yaml(config_file)) if config_file else set()
    keys |= {parse_override(text)[0] for text in overrides or []}
    keys |= {key for key, value in (flags or {}).items() if value is not None}
    return keys


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config values as ``{"train.epochs": 12, ...}`` (a mapping value, such as
    ``train.class_weights``, stays whole)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted in SECTION_KEYS:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


SECTION_KEYS = frozenset(item.name for item in fields(Config) if is_dataclass(item.default_factory))


def differences_from_defaults(values: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (default, value)}`` for each key of a run's config values (``config.yaml``,
    ``store.read_config_values``) that differs from imgclf's defaults; unknown keys (a newer
    or older imgclf's) are listed with the default ``None``."""
    defaults = flatten(asdict(Config()))
    return {
        key: (defaults.get(key), value)
        for key, value in flatten(values).items()
        if key not in defaults or defaults[key] != value
    }


def lookup(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def nest(dotted: str, value: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    cursor = result
    parts = dotted.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return result


def parse_override(text: str) -> tuple[str, Any]:
    """``train.epochs=5`` -> ("train.epochs", 5); the value is read as YAML."""
    key, separator, raw = text.partition("=")
    key = key.strip()
    if not separator or not key:
        raise UsageError(
            f"Invalid --set {text!r}: expected KEY=VALUE",
            "for example --set train.epochs=5 (see imgclf train --print-config for keys)",
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if key not in all_keys():
        raise unknown_key_error(key, f" (--set {text})")
    return key, value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}", "pass an existing YAML file to --config")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(
            f"Invalid YAML in {path}{where}: {problem}", "fix the syntax of the config file"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {path} is not UTF-8 text", "pass a YAML file") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys, got {type(document).__name__}")
    return document


def resolve_config(
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Build the effective config: defaults < ``base`` < YAML file < ``--set`` < flags.

    ``flags`` maps dotted keys to values of flags the user gave explicitly (None = not given).
    ``base`` is a stored config (e.g. of a resumed run).
    """
    config = Config()
    if base:
        apply_values(config, base)
    if config_file:
        apply_values(config, load_yaml(config_file), where=f" in {config_file}")
    for text in overrides or []:
        key, value = parse_override(text)
        apply_values(config, nest(key, value), where=f" (--set {text})")
    for key, value in (flags or {}).items():
        if value is not None:
            apply_values(config, nest(key, value))
    validate(config)
    return config


def documented_yaml(config: Config | None = None) -> str:
    """Every key with its value in ``config`` (default: its default) and a comment.

    What ``imgclf train --print-config`` prints (``--defaults``: without ``config``).
    """
    if config is None:
        lines = ["# imgclf training config: every key with its default.", ""]
        config = Config()
    else:
        lines = ["# imgclf training config: every key as this command would use it.", ""]
    lines.append(f"seed: {config.seed}  # one seed for the split, shuffling, initialisation and augmentation")
    for section in ("data", "model", "augment", "train"):
        lines.append(f"{section}:")
        section_value = getattr(config, section)
        docs = attribute_docs(type(section_value))
        hints = typing.get_type_hints(type(section_value))
        for item in dataclasses.fields(section_value):
            value = yaml.safe_dump(getattr(section_value, item.name), default_flow_style=True).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            comment = docs.get(item.name) or ""
            type_text = describe_type(hints[item.name])
            lines.append(f"  {item.name}: {value}  # {type_text}{'. ' + comment if comment else ''}")
    return "\n".join(lines) + "\n"


def attribute_docs(config_type: type) -> dict[str, str]:
    """The docstrings written under dataclass fields (read from the source)."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(config_type))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for previous, node in zip(body, body[1:], strict=False):
        if (
            isinstance(previous, ast.AnnAssign)
            and isinstance(previous.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[previous.target.id] = " ".join(node.value.value.split())
    return docs
