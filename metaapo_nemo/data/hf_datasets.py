"""Data named the way the ``datasets`` library names it: ``NAME[:SPLIT]`` in ``data.train`` and
``data.eval``, read offline.

Accepted forms (a value that is an existing file or folder is always read as that path, by
``schema``'s readers, exactly as before):

- ``DIR:SPLIT``: one split of a folder written by ``DatasetDict.save_to_disk``, or of a dataset
  repository downloaded as files (``huggingface-cli download --repo-type dataset NAME --local-dir
  DIR``: ``data/train_prefs-00000-of-00001.parquet`` and the like, which ``datasets`` maps to
  splits by their names).
- ``OWNER/NAME[:SPLIT]`` (or ``NAME:SPLIT``): a Hub dataset as ``datasets.load_dataset(NAME)`` left
  it in the local datasets cache (``HF_DATASETS_CACHE``, by default ``$HF_HOME/datasets``), or as
  ``huggingface-cli download --repo-type dataset NAME`` left it in the Hub cache (``HF_HUB_CACHE``).
  Nothing is downloaded: the run is offline (as on cluster nodes).

Without ``:SPLIT`` the only split is used, else ``train`` (data.train) or ``test`` (data.eval) when
the dataset has it; otherwise the error lists the splits. A wrong split, a dataset absent from
both caches, or one the cache cannot give, is one line (a ``DataError``) saying what to do.

Rows are the same records as those of a file: UltraFeedback-binarized (``prompt``, ``prompt_id``,
``chosen``/``rejected`` as chat messages) loads as it is.
"""

import contextlib
import glob
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaapo_nemo.config import ConfigError, one_line

_SPLIT = re.compile(r"\w+(\.\w+)*")  # datasets' own rule for split names
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".tsv", ".txt")
DEFAULT_SPLITS = {"train": "train", "eval": "test"}


def _error(message: str) -> ConfigError:
    """A ``schema.DataError`` (imported here when raised: schema imports this module)."""
    from metaapo_nemo.data.schema import DataError

    return DataError(message)


@dataclass(frozen=True)
class DatasetReference:
    """``value`` as given; ``name`` a local folder or a Hub name; ``split`` None when omitted."""

    value: str
    name: str
    split: str | None
    local: bool  # name is a local folder


def parse(value: str) -> DatasetReference | None:
    """The dataset ``value`` names, or None when it is a path for the file readers (an existing
    path, or one that looks like a file: their 'no such file' message is the right one)."""
    if os.path.exists(value):
        return None
    head, colon, split = value.rpartition(":")
    if colon and head and _SPLIT.fullmatch(split):
        if os.path.isdir(head):
            return DatasetReference(value, head, split, local=True)
        if os.path.exists(head):
            raise _error(f"{value}: {head} is a file, which has no splits; drop ':{split}'")
        if _HUB_NAME.fullmatch(head) and not head.endswith(_FILE_SUFFIXES):
            return DatasetReference(value, head, split, local=False)
        raise _error(f"{value}: {head}: no such file or folder, nor a dataset name (OWNER/NAME); "
                           "check the data path")
    if "/" in value and _HUB_NAME.fullmatch(value) and not value.endswith(_FILE_SUFFIXES):
        return DatasetReference(value, value, None, local=False)
    return None


def rows(reference: DatasetReference, role: str) -> Iterator[tuple[int, str, Any]]:
    """``(number, where, row)`` for every row of the split, ``number`` 1-based; ``role`` is
    ``train`` or ``eval`` (it picks the default split)."""
    import datasets

    # A folder of data files is streamed: nothing to keep, so its builder's lock files go to a scratch folder.
    with _offline(), tempfile.TemporaryDirectory(prefix="metaapo-datasets-") as scratch:
        if reference.local:
            dataset = _local(reference, role, datasets, scratch)
        else:
            dataset = _cached(reference, role, datasets, scratch)
        for index, row in enumerate(dataset, start=1):
            yield index, f"{reference.value}, record {index}", row


@contextlib.contextmanager
def _offline():
    """datasets and huggingface_hub read HF_HUB_OFFLINE when imported; set it for this read only."""
    import datasets
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _pick_split(reference: DatasetReference, splits: list[str], role: str) -> str:
    shown = reference.name if reference.split is None else reference.value
    if not splits:
        raise _error(f"{shown}: the dataset holds no splits; give a dataset with data, or a .jsonl "
                           "or .parquet file")
    if reference.split is not None:
        if reference.split in splits:
            return reference.split
        raise _error(f"{reference.value}: no split '{reference.split}'; {reference.name} has the splits "
                           f"{', '.join(splits)}: give one, e.g. {reference.name}:{splits[0]}")
    if len(splits) == 1:
        return splits[0]
    default = DEFAULT_SPLITS[role]
    if default in splits:
        return default
    raise _error(f"{reference.name}: holds the splits {', '.join(splits)} and no '{default}'; name the "
                       f"split: {reference.name}:{splits[0]}")


def _local(reference: DatasetReference, role: str, datasets, scratch: str):
    """A save_to_disk folder, else a folder of data files (a downloaded dataset repository)."""
    folder = reference.name
    if any(os.path.exists(os.path.join(folder, name))
           for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
        try:
            saved = datasets.load_from_disk(folder)
        except Exception as error:  # FileNotFoundError, ValueError or Arrow's errors
            raise _error(f"{reference.value}: {folder} cannot be read by datasets' load_from_disk "
                               f"({one_line(error)}); save it again") from error
        if not isinstance(saved, datasets.DatasetDict):
            raise _error(f"{reference.value}: {folder} holds a single dataset, which has no splits; "
                               f"drop ':{reference.split}'")
        return saved[_pick_split(reference, sorted(saved), role)]
    return _data_files(reference, folder, role, datasets, scratch)


def folder_splits(folder: str | Path) -> list[str]:
    """The splits ``datasets.load_dataset(folder)`` finds in a folder of data files (by the files'
    names); [] when it finds none or cannot tell. For hints in error messages."""
    import datasets

    try:
        with _offline(), tempfile.TemporaryDirectory(prefix="metaapo-datasets-") as scratch:
            return sorted(datasets.load_dataset_builder(str(folder), cache_dir=scratch).config.data_files or {})
    except Exception:  # only a hint: any failure means no hint
        return []


def _data_files(reference: DatasetReference, folder: str, role: str, datasets, scratch: str):
    """Stream one split of a folder of data files, as ``datasets.load_dataset(folder)`` maps them."""
    try:
        builder = datasets.load_dataset_builder(folder, cache_dir=scratch)
        splits = sorted(builder.config.data_files or {})
    except Exception as error:  # datasets raises FileNotFoundError, ValueError, DataFilesNotFoundError
        raise _error(f"{reference.value}: {folder} holds no dataset datasets can read ({one_line(error)}); "
                           "give a save_to_disk folder, a folder of Parquet/JSON Lines files, or a file") from error
    split = _pick_split(reference, splits, role)
    try:
        return datasets.load_dataset(folder, split=split, streaming=True, cache_dir=scratch)
    except Exception as error:
        raise _error(f"{reference.value}: split '{split}' of {folder} cannot be read "
                           f"({one_line(error)}); check its files") from error


def _cache_folder(name: str, cache: str) -> str:
    from datasets.naming import camelcase_to_snakecase

    parts = name.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    return os.path.join(cache, "___".join(parts))


def _cached(reference: DatasetReference, role: str, datasets, scratch: str):
    """A Hub dataset from the datasets cache (what load_dataset prepared), else the Hub cache."""
    import huggingface_hub
    import huggingface_hub.constants

    name = reference.name
    cache = os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE))
    if any(os.path.isdir(p) for p in glob.glob(os.path.join(_cache_folder(name, cache), "*", "*", "*"))):
        try:
            builder = datasets.load_dataset_builder(name, cache_dir=cache)
            splits = sorted(builder.info.splits or {})
        except Exception as error:  # datasets raises ValueError (several configs) or FileNotFoundError
            raise _error(f"{reference.value}: the local datasets cache ({cache}) cannot give {name} "
                               f"({one_line(error)}); load it again with datasets.load_dataset('{name}')") from error
        split = _pick_split(reference, splits, role)
        try:
            return builder.as_dataset(split=split)
        except Exception as error:
            raise _error(f"{reference.value}: split '{split}' of {name} in the local datasets cache "
                               f"({cache}) cannot be read ({one_line(error)}); load it again with "
                               f"datasets.load_dataset('{name}')") from error
    hub_cache = os.path.expanduser(str(huggingface_hub.constants.HF_HUB_CACHE))
    try:
        snapshot = huggingface_hub.snapshot_download(name, repo_type="dataset", cache_dir=hub_cache,
                                                     local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, or a name the Hub's rules refuse
        snapshot = None
    if snapshot is not None:
        return _data_files(reference, snapshot, role, datasets, scratch)
    raise _error(
        f"{reference.value}: dataset {name} is not in the local cache ({cache}, nor the Hub cache {hub_cache}) "
        "and this run does not download; on a machine with network run "
        f"`python -c \"import datasets; datasets.load_dataset('{name}')\"` with the same HF_DATASETS_CACHE "
        f"(or HF_HOME), or download its files (huggingface-cli download --repo-type dataset {name} --local-dir DIR) "
        "and give DIR:SPLIT"
    )
