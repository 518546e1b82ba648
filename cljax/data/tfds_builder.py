"""The benchmark as a versioned TFDS dataset, built from the JSON directory (``manual_dir``).

On TPU VMs the data is then read from TFDS shards (e.g. on GCS) instead of loose JSON files.
Shards are written in the ``array_record`` format and read back with
``builder.as_data_source`` (random access, no TensorFlow): building and reading need only
``tensorflow-datasets`` (the ``tfds`` extra), not TensorFlow itself. ``as_dataset`` (a
``tf.data`` pipeline) would need TensorFlow and is not used.

One builder config per registered dataset (``cl_benchmark/agnews``, ``cl_benchmark/SST-2``,
...); the splits are the files present (``train``, ``dev``, ``test``). Items are stored raw
(``sentence``, ``label``, ``source_index``), including labels that are not options, so the
same screening as for JSON files (``sources.screen_examples``) applies when reading; the
option list is stored in the dataset's metadata and checked against the registry.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from cljax.data.sources import available_splits, read_labels, read_split_file, resolve_data_dir
from cljax.data.tasks import DATASETS, DatasetSpec
from cljax.errors import DataError, UnknownNameError

FILE_FORMAT = "array_record"


class ClBenchmark(tfds.core.GeneratorBasedBuilder):
    """The O-LoRA continual-learning benchmark (15 text-classification datasets)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The O-LoRA CL_Benchmark JSON files, one config per dataset."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=name, description=f"{spec.task_type}/{name}")
        for name, spec in DATASETS.items()
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point manual_dir at the benchmark root laid out as "
        "<Type>/<Dataset>/{train,dev,test,labels}.json (the O-LoRA CL_Benchmark folder)."
    )

    @property
    def _spec(self) -> DatasetSpec:
        return DATASETS[self.builder_config.name]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Text classification as generation; the label is an option string.",
            features=tfds.features.FeaturesDict(
                {
                    "sentence": tfds.features.Text(),
                    "label": tfds.features.Text(),
                    "source_index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            metadata=tfds.core.MetadataDict(options=list(self._spec.options)),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):  # noqa: ANN202
        directory = Path(dl_manager.manual_dir) / self._spec.relative_dir
        if not directory.is_dir():
            raise FileNotFoundError(
                f"dataset {self._spec.name!r}: directory {directory} not found under manual_dir"
            )
        read_labels(directory / "labels.json", self._spec)
        splits = available_splits(directory)
        if not splits:
            raise FileNotFoundError(f"dataset {self._spec.name!r}: no split files in {directory}")
        return {s: self._generate_examples(directory / f"{s}.json") for s in splits}

    def _generate_examples(self, path: Path):  # noqa: ANN202
        for index, (sentence, label) in enumerate(read_split_file(path)):
            yield index, {"sentence": sentence, "label": label, "source_index": index}


def build_tfds(
    name: str,
    manual_dir: str | os.PathLike[str] | None,
    data_dir: str | os.PathLike[str],
) -> ClBenchmark:
    """The prepared builder for dataset ``name``: shards under ``data_dir`` (a local or
    ``gs://`` path), reused when present, else built from ``manual_dir`` (the JSON benchmark
    root; None: resolved like ``SourceConfig.data_dir``, see ``sources.resolve_data_dir``)."""
    if name not in DATASETS:
        raise UnknownNameError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    builder = ClBenchmark(config=name, data_dir=str(data_dir), file_format=FILE_FORMAT)
    if not builder.is_prepared():
        source = resolve_data_dir(manual_dir)
        tfds.disable_progress_bar()
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(source))
        )
    return builder


def read_tfds_splits(
    spec: DatasetSpec,
    manual_dir: str | os.PathLike[str] | None,
    data_dir: str | os.PathLike[str],
) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """``{split: (origin, [(sentence, label), ...])}`` in source-file order (TFDS shuffles
    on write; ``source_index`` restores the order, so that seeded subsampling and held-out
    splits select the same examples as from the JSON files)."""
    builder = build_tfds(spec.name, manual_dir, data_dir)
    stored = list(builder.info.metadata.get("options", []))
    if stored != list(spec.options):
        raise DataError(
            f"TFDS dataset {builder.data_dir}: stored options {stored} differ from the "
            f"registered options of {spec.name!r}: {list(spec.options)}"
        )
    out: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split=split)
        rows = [source[i] for i in range(len(source))]
        rows.sort(key=lambda r: int(r["source_index"]))
        pairs = [(r["sentence"].decode("utf-8"), r["label"].decode("utf-8")) for r in rows]
        out[split] = (f"tfds:{builder.data_dir}/{split}", pairs)
    return out
