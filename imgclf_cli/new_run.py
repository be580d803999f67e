"""A new run: scan the dataset, split it, create the run folder and record what it is made of.

The run's training lock is taken as soon as its folder exists (``imgclf_cli.liveness``), so the
run is never seen without an owner while it is being set up.
"""

from __future__ import annotations

import contextlib
import platform
import time
from pathlib import Path

from imgclf_cli import __version__, store
from imgclf_cli.config import Config
from imgclf_cli.dataset import (
    DatasetScan,
    SplitManifest,
    count_per_class,
    make_manifest,
    scan_dataset,
    skipped_as_dicts,
)
from imgclf_cli.liveness import TrainingLock
from imgclf_cli.model_names import canonical_model_name
from imgclf_cli.training_events import TrainingListener


def library_versions() -> dict[str, str]:
    """What the run was made with (meta.json's ``versions``)."""
    import keras
    import numpy as np
    import PIL
    import sklearn
    import tensorflow as tf

    return {
        "imgclf": __version__,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
    }


def prepare_new_run(
    data_dir: str | Path,
    config: Config,
    runs_dir: str | Path | None,
    name: str | None,
    listener: TrainingListener,
    held: contextlib.ExitStack,
) -> tuple[Path, SplitManifest, DatasetScan]:
    started = time.perf_counter()
    listener.on_status("Scanning images...")
    scan = scan_dataset(data_dir)
    manifest = make_manifest(scan, config.data.validation_split, config.seed)
    config.resolve_image_size(scan.median_short_side)
    model_name = canonical_model_name(config.model.name)
    run_dir = store.create_run_dir(store.runs_root(runs_dir), model_name, name)
    held.enter_context(TrainingLock(run_dir))
    store.write_config(run_dir, config)
    store.write_labels(run_dir, manifest.classes)
    store.write_manifest(run_dir, manifest)
    train_counts = count_per_class(manifest.train, len(manifest.classes))
    store.update_meta(
        run_dir,
        run_id=run_dir.name,
        status=store.STATUS_RUNNING,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model=model_name,
        image_size=list(config.image_size),
        versions=library_versions(),
        dataset={
            "root": scan.root,
            "layout": scan.layout,
            "fingerprint": scan.fingerprint(),
            "num_images": scan.num_images,
            "num_train": len(manifest.train),
            "num_val": len(manifest.val),
            "num_test": len(manifest.test),
            "train_per_class": dict(zip(manifest.classes, train_counts, strict=True)),
        },
        scan_seconds=round(time.perf_counter() - started, 3),
        skipped_files=skipped_as_dicts(scan.skipped),
    )
    return run_dir, manifest, scan
