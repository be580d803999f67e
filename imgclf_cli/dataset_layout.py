"""The one walk of a dataset folder: its layout, splits, classes and files, without opening a file.

Training, evaluation (``imgclf_cli.dataset.scan_dataset``) and ``inspect-dataset``
(``imgclf_cli.inspection``) all read a dataset through ``list_dataset``, so they agree on which
files belong to which class and split, and on what is left out. Two layouts are understood:

* ``DATA_DIR/<class>/<images>``: one folder per class (the ``folders`` layout).
* ``DATA_DIR/{train|training,val|valid|validation,test|testing}/<class>/<images>``: the
  ``splits`` layout, recognised when a ``train`` folder is present.

Hidden and system files (``.DS_Store``, ``Thumbs.db``, ``._*`` and anything under a hidden
folder) are never read. ``DATA_DIR`` may be the URL of a folder on an object store
(``s3://bucket/prefix``): it is walked as a ``imgclf_cli.filesystems.RemotePath``, listed in one
recursive listing. Only the standard library is used, so this module is light to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imgclf_cli.errors import DatasetError
from imgclf_cli.filesystems import RemotePath, is_url, remote_path

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
SPLIT_ORDER = tuple(dict.fromkeys(SPLIT_ALIASES.values()))  # train, val, test
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", ".ds_store", "icon\r"})
# A local file or folder, or one on an object store (whose ``str()`` is its URL).
DatasetPath = Path | RemotePath


@dataclass(frozen=True)
class DatasetFile:
    """One file of a class folder: read as an image of ``class_name`` unless it proves not to be one."""

    path: DatasetPath
    relative_path: str
    """Relative to the dataset root, with ``/`` separators."""
    class_name: str
    split: str | None
    """``train``, ``val`` or ``test``; ``None`` in the ``folders`` layout."""


@dataclass
class DatasetListing:
    """Every file of a dataset folder: those read as images, and those left out.

    ``empty_class_folders``, ``hidden_files`` and ``ignored_paths`` are relative to ``root``
    with ``/`` separators; ``ignored_paths`` are files and folders outside any class folder.
    """

    root: DatasetPath
    layout: str
    """``folders`` (DATA_DIR/<class>/) or ``splits`` (DATA_DIR/train/<class>/ ...)."""
    split_folders: dict[str, DatasetPath]
    """The folder of each split found, in the order train, val, test (empty for ``folders``)."""
    classes: list[str]
    """Every class folder's name, sorted; a class is in it even when its folders are empty."""
    files: list[DatasetFile]
    """By split (train, val, test), then class, then path."""
    empty_class_folders: list[str]
    hidden_files: list[str]
    ignored_paths: list[str]

    @property
    def splits(self) -> list[str]:
        return list(self.split_folders)


def list_dataset(data_dir: str | Path) -> DatasetListing:
    """List the dataset in ``data_dir`` (no file is opened, nothing is written).

    Raises ``DatasetError`` when ``data_dir`` is missing, not a folder, or holds no class folder.
    """
    root = resolve_dataset_root(data_dir)
    if isinstance(root, RemotePath):
        root.load_tree()
    detected = detect_split_dirs(root)
    split_folders = {split: detected[split] for split in SPLIT_ORDER if split in detected}
    folders: dict[str | None, DatasetPath] = {None: root}
    if split_folders:
        folders = dict(split_folders)

    def relative(path: DatasetPath) -> str:
        return path.relative_to(root).as_posix()

    classes: set[str] = set()
    files: list[DatasetFile] = []
    empty_folders: list[str] = []
    hidden: list[str] = []
    ignored: list[str] = []
    for split, folder in folders.items():
        children = sorted(folder.iterdir())
        for child in children:
            if is_hidden_or_system(child):
                hidden.append(relative(child))
            elif not child.is_dir():
                ignored.append(relative(child))
        for class_dir in (child for child in children if child.is_dir() and not is_hidden_or_system(child)):
            classes.add(class_dir.name)
            kept, hidden_inside = class_folder_files(class_dir)
            if not kept:
                empty_folders.append(relative(class_dir))
            files.extend(DatasetFile(path, relative(path), class_dir.name, split) for path in kept)
            hidden.extend(relative(path) for path in hidden_inside)
    if split_folders:
        used = set(split_folders.values())
        for child in sorted(root.iterdir()):
            if child not in used:
                (hidden if is_hidden_or_system(child) else ignored).append(relative(child))
    if not classes:
        raise no_class_folders(root)
    return DatasetListing(
        root=root,
        layout="splits" if split_folders else "folders",
        split_folders=split_folders,
        classes=sorted(classes),
        files=files,
        empty_class_folders=empty_folders,
        hidden_files=sorted(hidden),
        ignored_paths=sorted(ignored),
    )


def check_dataset_folder(data_dir: str | Path, *, min_classes: int = 1) -> list[str]:
    """The class names of the dataset in ``data_dir``, from folder names alone.

    The checks of ``list_dataset`` that need no walk of the class folders, for a command to make
    in milliseconds before it loads TensorFlow. Raises ``DatasetError`` when ``data_dir`` is
    missing, not a folder, or holds fewer than ``min_classes`` class folders.
    """
    root = resolve_dataset_root(data_dir)
    folders = list(detect_split_dirs(root).values()) or [root]
    classes = sorted(
        {
            child.name
            for folder in folders
            for child in folder.iterdir()
            if child.is_dir() and not is_hidden_or_system(child)
        }
    )
    if not classes:
        raise no_class_folders(root)
    if len(classes) < min_classes:
        found = "one class" if len(classes) == 1 else f"{len(classes)} classes"
        raise DatasetError(
            f"Only {found} found in {root}: {', '.join(repr(name) for name in classes)}",
            f"a classifier needs at least {min_classes} class folders",
        )
    return classes


def no_class_folders(root: DatasetPath) -> DatasetError:
    return DatasetError(
        f"No class folders in {root}",
        "expected DATA_DIR/<class>/<images> or DATA_DIR/train/<class>/<images>",
    )


def resolve_dataset_root(data_dir: str | Path) -> DatasetPath:
    """The absolute dataset folder; a ``DatasetError`` when it is missing or not a folder."""
    if is_url(data_dir):
        return resolve_remote_root(str(data_dir))
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DatasetError(
            f"Dataset folder not found: {root}",
            "pass a folder that holds one sub-folder of images per class",
        )
    if not root.is_dir():
        raise DatasetError(
            f"Dataset path is not a folder: {root}", "pass the folder that holds the class folders"
        )
    return root.resolve()


def resolve_remote_root(url: str) -> RemotePath:
    """The dataset folder at ``url``; ``DatasetError`` when nothing or a single file is there
    (and ``RemoteStorageError`` when the store cannot be read)."""
    found = remote_path(url)
    if found is None:
        raise DatasetError(
            f"Dataset folder not found: {url}",
            "pass the URL of the prefix that holds one folder of images per class "
            "(s3://BUCKET/PREFIX for s3://BUCKET/PREFIX/<class>/<image>)",
        )
    if not found.is_dir():
        raise DatasetError(
            f"Dataset path is not a folder: {url}", "pass the URL of the prefix that holds the class folders"
        )
    return found


def is_hidden_or_system(path: DatasetPath) -> bool:
    return path.name.startswith(".") or path.name.lower() in SYSTEM_FILES


def detect_split_dirs(root: DatasetPath) -> dict[str, DatasetPath]:
    """Map ``train``/``val``/``test`` to folders of ``root`` when it uses the splits layout.

    Folders are tried in name order, so of ``val/`` and ``validation/`` only ``val/`` is used.
    """
    found: dict[str, DatasetPath] = {}
    for child in sorted(root.iterdir()):
        split = SPLIT_ALIASES.get(child.name.lower())
        if child.is_dir() and split and split not in found:
            found[split] = child
    return found if "train" in found else {}


def class_folder_files(class_dir: DatasetPath) -> tuple[list[DatasetPath], list[DatasetPath]]:
    """The files under a class folder (recursively) that are read, and the hidden ones; each sorted."""
    kept: list[DatasetPath] = []
    hidden: list[DatasetPath] = []
    for path in class_dir.rglob("*"):
        if path.is_file():
            inside_hidden_folder = any(part.startswith(".") for part in path.relative_to(class_dir).parts)
            (hidden if inside_hidden_folder or is_hidden_or_system(path) else kept).append(path)
    return sorted(kept), sorted(hidden)
