"""Datasets and images on object stores: ``s3://``, ``gs://`` and ``az://`` URLs, read through fsspec.

Local paths never come here: callers ask ``is_url`` first and keep their ``os``/``pathlib`` code
(and its speed). A URL is listed and read through one fsspec file system per store, created
once per process and shared by every thread: s3fs, gcsfs and adlfs run their requests on
fsspec's own event loop, so the scan's thread pool and tf.data's parallel decode calls all read
at once, one GET per image. Nothing is cached here: the training pipeline caches decoded images
after the first epoch (``imgclf_cli.pipeline``), so later epochs make no request at all.

The packages are optional extras: ``pip install "imgclf[s3]"`` (s3fs; S3-compatible stores such
as MinIO through ``AWS_ENDPOINT_URL``), ``imgclf[gcs]`` (gcsfs) and ``imgclf[azure]`` (adlfs).
Whatever goes wrong on the way to the store (a missing extra or bucket, credentials refused,
an endpoint that cannot be reached) becomes a ``RemoteStorageError``: one line saying what, for
which URL, and how to fix it. S3 requests time out and are retried a bounded number of times,
so nothing hangs. A missing object stays a ``FileNotFoundError``, as a vanished local file is.

Only the standard library is imported here; fsspec loads on the first URL.
"""

from __future__ import annotations

import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from imgclf_cli.errors import DatasetError, ImgclfError, UsageError

URL_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://(.*)$")
# A header read asks for this much of an object: every format's header fits, bar JPEGs with
# huge EXIF or ICC blocks, which are then read whole (see imgclf_cli.images.read_header).
HEADER_BYTES = 64 * 1024
# S3: seconds to open a connection and to wait for data on it; s3fs then retries a read that
# timed out this many times in all, each try itself retried by botocore (AWS_MAX_ATTEMPTS,
# default 3): a store that stops answering fails in minutes, not never.
CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 30
S3FS_ATTEMPTS = 2
# Where s3fs, gcsfs and adlfs listings give an object's ETag or MD5, else its modification time.
VERSION_KEYS = ("ETag", "etag", "md5Hash", "content_md5", "LastModified", "last_modified", "updated", "mtime")


class RemoteStorageError(DatasetError):
    """An object store that cannot be read: missing extra or bucket, credentials, network."""


@dataclass(frozen=True)
class ObjectStore:
    """One kind of object store: the fsspec package that reads it and how to give it access."""

    title: str
    protocol: str
    package: str
    extra: str
    credentials: str
    """How to give imgclf credentials that may read the data (a hint)."""

    def options(self) -> dict[str, Any]:
        # Listings are not cached by the file system: a dataset is listed once per command by
        # imgclf itself, and a notebook that trains again must see the images added since.
        options: dict[str, Any] = {"use_listings_cache": False}
        if self.protocol == "s3":
            options["config_kwargs"] = {
                "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                "read_timeout": READ_TIMEOUT_SECONDS,
                # No max_attempts here, so that AWS_MAX_ATTEMPTS keeps its standard meaning.
                "retries": {"mode": "standard"},
            }
        return options

    def network_hint(self) -> str:
        if self.protocol != "s3":
            return "check the network connection and the account or bucket name"
        endpoint = s3_endpoint()
        if endpoint:
            return f"check that the endpoint AWS_ENDPOINT_URL={endpoint} is up and reachable from here"
        return (
            "check the network connection; for MinIO or another S3-compatible store, "
            "set AWS_ENDPOINT_URL to its address"
        )


S3 = ObjectStore(
    title="S3",
    protocol="s3",
    package="s3fs",
    extra="s3",
    credentials="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
    "to credentials that may read it",
)
GCS = ObjectStore(
    title="Google Cloud Storage",
    protocol="gs",
    package="gcsfs",
    extra="gcs",
    credentials="set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, "
    "or run: gcloud auth application-default login",
)
AZURE = ObjectStore(
    title="Azure Blob Storage",
    protocol="az",
    package="adlfs",
    extra="azure",
    credentials="set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY "
    "(or AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_SAS_TOKEN)",
)
STORES = {"s3": S3, "s3a": S3, "gs": GCS, "gcs": GCS, "az": AZURE, "abfs": AZURE, "abfss": AZURE}

# Error codes (S3's, Azure's) that mean the bucket or container itself is missing.
BUCKET_MISSING_CODES = frozenset({"NoSuchBucket", "ContainerNotFound"})
# Exception class names, anywhere in an error's MRO, by what they mean; names rather than
# classes because botocore, google-auth and azure-core are only there with their extras.
CREDENTIAL_ERRORS = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "DefaultCredentialsError",
        "RefreshError",
        "ClientAuthenticationError",
    }
)
NETWORK_ERRORS = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ProxyConnectionError",
        "HTTPClientError",
        "ClientConnectionError",
        "ServerTimeoutError",
        "ServiceRequestError",
        "ServiceResponseError",
        "TimeoutError",  # asyncio's, fsspec's FSTimeoutError, Python's own
    }
)
# Credential errors that mean none were found, rather than refused.
NO_CREDENTIALS_ERRORS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}
)

_lock = threading.Lock()
_filesystems: dict[tuple[str, int], Any] = {}
# The latest errors raised, for failure_behind: parallel reads fail together, and TensorFlow
# reports one of them, not necessarily the last.
_recent_failures: deque[RemoteStorageError] = deque(maxlen=256)


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(path, (str, RemotePath)) and URL_PATTERN.match(str(path)) is not None


def split_url(url: str) -> tuple[ObjectStore, str]:
    """The store of ``url`` and the path fsspec names it by (``bucket/key``, no trailing ``/``)."""
    match = URL_PATTERN.match(url)
    if match is None:
        raise UsageError(f"Not a URL: {url}", "object store URLs look like s3://bucket/prefix")
    scheme, rest = match.group(1).lower(), match.group(2).strip("/")
    store = STORES.get(scheme)
    if store is None:
        raise UsageError(
            f"Unsupported URL scheme {scheme}:// in {url}",
            "imgclf reads local paths and s3://, gs:// and az:// URLs",
        )
    if not rest:
        raise UsageError(f"No bucket in {url}", f"pass {scheme}://BUCKET/PREFIX")
    return store, rest


def url_of(url: str, fs_path: str) -> str:
    """The URL of ``fs_path`` (as fsspec names it), with the scheme ``url`` was written with."""
    scheme = url.split("://", 1)[0]
    return f"{scheme}://{fs_path.strip('/')}"


def s3_endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def filesystem(url: str) -> Any:
    """The fsspec file system for ``url``'s store: one per store and process, shared by threads."""
    store, _ = split_url(url)
    key = (store.protocol, os.getpid())  # an instance does not survive a fork
    with _lock:
        existing = _filesystems.get(key)
        if existing is not None:
            return existing
        try:
            import fsspec

            created = fsspec.filesystem(store.protocol, **store.options())
            if store.protocol == "s3":
                # Attributes of s3fs rather than arguments (which older releases would pass on
                # to botocore's session, which refuses them).
                created.retries = S3FS_ATTEMPTS
                # One GET per image: a whole-object read in parallel parts starts with a HEAD.
                created.max_concurrency = 1
        except ImportError:
            raise record(
                RemoteStorageError(
                    f"Reading {url} needs the {store.package} package, which is not installed",
                    f'install it: pip install "imgclf[{store.extra}]"',
                )
            ) from None
        except Exception as error:
            # adlfs connects when created: no account name or credentials fail here.
            translated = translate(url, error)
            if translated is error:
                translated = record(
                    RemoteStorageError(
                        f"Cannot open {store.title} for {url}: {first_line(error)}", store.credentials
                    )
                )
            raise translated from None
        _filesystems[key] = created
        return created


def forget_filesystems() -> None:
    """Drop the file systems made so far: the next URL makes a new one, which reads the
    credentials and ``AWS_ENDPOINT_URL`` again (for a notebook whose environment changed)."""
    with _lock:
        for made in _filesystems.values():
            type(made).clear_instance_cache()
        _filesystems.clear()


def record(error: RemoteStorageError) -> RemoteStorageError:
    _recent_failures.append(error)  # deque appends are thread-safe
    return error


def failure_behind(error: BaseException) -> RemoteStorageError | None:
    """The ``RemoteStorageError`` that caused ``error``, when ``error`` is its copy.

    TensorFlow re-raises an error of a tf.data decode thread as its own ``UnknownError``, with
    the original's text but not its type: this finds the original again, to report it in one line.
    """
    if isinstance(error, ImgclfError):
        return None
    text = str(error)
    return next((failure for failure in reversed(_recent_failures) if failure.message in text), None)


def error_code(error: BaseException) -> str:
    """The store's error code (``NoSuchBucket``...) carried by ``error`` or what caused it."""
    seen: BaseException | None = error
    for _ in range(4):
        if seen is None:
            break
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return str((response.get("Error") or {}).get("Code") or "")
        code = getattr(seen, "error_code", None)
        if code:
            return str(code)
        seen = seen.__cause__ or seen.__context__
    return ""


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def translate(url: str, error: BaseException) -> BaseException:
    """``error``, raised while reading ``url``, as the one-line error to report.

    A missing object stays a ``FileNotFoundError`` (callers treat it as a vanished file);
    errors of an unknown kind are returned as they are, to keep their traceback.
    """
    if isinstance(error, ImgclfError):
        return error
    store, fs_path = split_url(url)
    names = {cls.__name__ for cls in type(error).__mro__}
    code = error_code(error)
    detail = first_line(error)
    if code in BUCKET_MISSING_CODES or (
        isinstance(error, FileNotFoundError) and re.search(r"(bucket|container).*not exist", detail, re.I)
    ):
        bucket = url_of(url, fs_path.split("/", 1)[0])
        where = f" (endpoint {s3_endpoint()})" if store.protocol == "s3" and s3_endpoint() else ""
        return record(
            RemoteStorageError(
                f"Bucket not found: {bucket}{where}, reading {url}",
                "check the bucket name in the URL, and that the credentials are for its account",
            )
        )
    if isinstance(error, FileNotFoundError):
        return error
    if names & NO_CREDENTIALS_ERRORS:
        return record(RemoteStorageError(f"No credentials to read {url}: {detail}", store.credentials))
    if isinstance(error, PermissionError) or names & CREDENTIAL_ERRORS:
        return record(RemoteStorageError(f"Access to {url} was refused: {detail}", store.credentials))
    if names & NETWORK_ERRORS or isinstance(error, (ConnectionError, TimeoutError)):
        endpoint = f" at {s3_endpoint()}" if store.protocol == "s3" and s3_endpoint() else ""
        return record(
            RemoteStorageError(
                f"Cannot reach {store.title}{endpoint} to read {url}: {detail}", store.network_hint()
            )
        )
    if isinstance(error, OSError):
        return record(
            RemoteStorageError(f"Cannot read {url}: {detail}", f"check the URL and access to {store.title}")
        )
    return error


@contextmanager
def reporting(url: str) -> Iterator[None]:
    """Raise what goes wrong in the block as ``translate`` words it."""
    try:
        yield
    except Exception as error:
        translated = translate(url, error)
        if translated is error:
            raise
        raise translated from None


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of the object at ``url`` (from ``start`` up to ``end``, when given): one GET."""
    fs = filesystem(url)
    _, fs_path = split_url(url)
    with reporting(url):
        try:
            return bytes(fs.cat_file(fs_path, start=start, end=end))
        except OSError as error:
            if start == 0 and error_code(error) == "InvalidRange":
                return b""  # S3 refuses every range of an empty object
            raise


def version_of(entry: dict[str, Any]) -> str:
    """What tells one version of an object from another in a listing: its ETag or MD5, else its
    modification time."""
    for key in VERSION_KEYS:
        value = entry.get(key)
        if value:
            return str(value).strip('"')
    return ""


class RemotePath:
    """A folder or file of an object store, with the part of ``pathlib.Path``'s API that the
    dataset walk (``imgclf_cli.dataset_layout``) and the predict file search use.

    ``str()`` gives its URL. Folders list their children once, when first asked; a file knows
    its size and version (ETag) from the listing that found it, so a dataset's fingerprint needs
    no read.
    """

    def __init__(self, url: str, folder: bool, size: int = 0, version: str = "") -> None:
        self.url = url.rstrip("/")
        self.folder = folder
        self.size = size
        self.version = version
        self._children: list[RemotePath] | None = None
        self._files: list[RemotePath] | None = None

    @classmethod
    def from_entry(cls, url: str, entry: dict[str, Any]) -> RemotePath:
        folder = entry.get("type") == "directory"
        return cls(url_of(url, entry["name"]), folder, int(entry.get("size") or 0), version_of(entry))

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: RemotePath) -> bool:
        return self.url < other.url

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    def is_dir(self) -> bool:
        return self.folder

    def is_file(self) -> bool:
        return not self.folder

    def exists(self) -> bool:
        return True  # made from a listing that found it

    def expanduser(self) -> RemotePath:
        return self

    def resolve(self) -> RemotePath:
        return self

    def relative_to(self, other: RemotePath) -> PurePosixPath:
        return PurePosixPath(relative_path(self.url, other.url))

    def iterdir(self) -> Iterator[RemotePath]:
        """The files and folders directly inside this folder (one listing request)."""
        if self._children is None:
            fs = filesystem(self.url)
            _, fs_path = split_url(self.url)
            with reporting(self.url):
                entries = fs.ls(fs_path, detail=True)
            self._children = [
                RemotePath.from_entry(self.url, entry)
                for entry in entries
                if entry["name"].strip("/") != fs_path and not entry["name"].endswith("/")
            ]
        return iter(self._children)

    def rglob(self, pattern: str) -> Iterator[RemotePath]:
        """Every file under this folder, at any depth (one listing of the prefix; ``pattern``
        must be ``*``: folders exist only as the prefixes of files)."""
        if pattern != "*":
            raise ValueError(f"RemotePath.rglob only supports '*', got {pattern!r}")
        return iter(self._files if self._files is not None else list_files(self.url))

    def load_tree(self) -> None:
        """List everything under this folder at once (one listing, paged by the store), so that
        ``iterdir`` and ``rglob`` here and in every sub-folder need no further request."""
        folders = {self.url: self}
        children: dict[str, list[RemotePath]] = {self.url: []}
        files_under: dict[str, list[RemotePath]] = {self.url: []}
        for file in list_files(self.url):
            parent = self.url
            files_under[parent].append(file)
            *folder_names, _ = relative_path(file.url, self.url).split("/")
            for name in folder_names:
                url = f"{parent}/{name}"
                if url not in folders:
                    folders[url] = RemotePath(url, folder=True)
                    children[url], files_under[url] = [], []
                    children[parent].append(folders[url])
                files_under[url].append(file)
                parent = url
            children[parent].append(file)
        for url, folder in folders.items():
            folder._children, folder._files = children[url], files_under[url]

    def read_bytes(self) -> bytes:
        return read_bytes(self.url)


def list_files(url: str) -> list[RemotePath]:
    """Every object under the folder ``url`` (recursively), sorted; ``[]`` when there is none."""
    fs = filesystem(url)
    _, fs_path = split_url(url)
    try:
        with reporting(url):
            entries = fs.find(fs_path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(
        RemotePath.from_entry(url, entry)
        for name, entry in entries.items()
        if entry.get("type", "file") == "file" and not name.endswith("/") and name.strip("/") != fs_path
    )


def remote_path(url: str) -> RemotePath | None:
    """The file or folder at ``url``; ``None`` when there is neither."""
    fs = filesystem(url)
    _, fs_path = split_url(url)
    try:
        with reporting(url):
            info = fs.info(fs_path)
    except FileNotFoundError:
        return None
    if info.get("type") == "directory":
        return RemotePath(url, folder=True)
    return RemotePath(url, folder=False, size=int(info.get("size") or 0), version=version_of(info))


def glob(pattern: str) -> list[RemotePath]:
    """The files and folders matching the pattern URL (``*``, ``**``, ``?``, ``[...]``), sorted."""
    fs = filesystem(pattern)
    _, fs_path = split_url(pattern)
    try:
        with reporting(pattern):
            matches = fs.glob(fs_path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(RemotePath.from_entry(pattern, found) for found in matches.values())


def join(root: str, relative: str) -> str:
    """``relative`` (``/``-separated) under ``root``: a URL under a URL, else a local path."""
    if is_url(root):
        return f"{root.rstrip('/')}/{relative}"
    return str(Path(root) / relative)


def relative_path(path: str, root: str) -> str:
    """``path`` relative to ``root``, ``/``-separated; ``ValueError`` when it is not under it."""
    if is_url(root):
        prefix = root.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise ValueError(f"{path} is not under {root}")
        return path[len(prefix) :]
    return Path(path).relative_to(root).as_posix()


def exists_checker(root: str) -> Callable[[str], bool]:
    """A test of whether a file under ``root`` exists: ``os.path.exists`` for a local root; for
    a URL, membership in one listing of ``root`` (rather than one request per file)."""
    if not is_url(root):
        return lambda path: Path(path).exists()
    listed = {file.url for file in list_files(root)}
    return listed.__contains__
