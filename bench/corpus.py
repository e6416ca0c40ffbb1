"""The training corpus: the Python standard library's own ``.py`` files, byte-level.

Every Python install ships this text, so the benchmark needs no download. Files are listed under
``sysconfig.get_paths()["stdlib"]`` (skipping ``site-packages`` / ``dist-packages``), sorted by their
POSIX relative path, and split *by file* into train and validation with a stable hash of that path,
so the split is the same on every machine and no validation text leaks into training through a
shared file. Each split is the concatenation of its files' bytes, stored as a 1-D uint8 tensor;
a token is a byte (vocabulary 256).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

#: Directories under the stdlib root that hold third-party code, not the standard library.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
#: Bytes put between two concatenated files, so a window that crosses files sees a clear break.
FILE_SEPARATOR = b"\n\n"


def stdlib_root() -> Path:
    """The directory holding this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: Path | str) -> list[str]:
    """Every ``.py`` file under ``root`` outside third-party directories.

    Returns POSIX paths relative to ``root``, sorted, so the list (and everything derived from it)
    is deterministic across runs and platforms.
    """
    root = Path(root)
    found: list[str] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]
        for name in files:
            if name.endswith(".py"):
                found.append((Path(directory) / name).relative_to(root).as_posix())
    return sorted(found)


def is_validation_file(relative_path: str, val_fraction: float) -> bool:
    """Whether a file belongs to the validation split.

    The decision depends only on the path (SHA-256 of its UTF-8 bytes mapped to [0, 1)), not on
    Python's salted ``hash`` or on which other files exist, so adding a file never moves another.
    """
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def split_files(paths: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Split relative paths into ``(train, val)`` by :func:`is_validation_file`, keeping order."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"Invalid val_fraction: {val_fraction} - should be in (0, 1)")
    train: list[str] = []
    val: list[str] = []
    for path in paths:
        (val if is_validation_file(path, val_fraction) else train).append(path)
    return train, val


@dataclass(frozen=True)
class ByteCorpus:
    """Train and validation text as flat byte tensors.

    Attributes:
        train, val: 1-D ``torch.uint8`` tensors, each the concatenation of its split's files.
        train_files, val_files: the relative paths that went into each split, in order.
        root: the directory the paths are relative to.
    """

    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    root: str

    def describe(self) -> dict[str, object]:
        """Sizes and provenance, for the JSON report."""
        return {
            "root": self.root,
            "train_files": len(self.train_files),
            "val_files": len(self.val_files),
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
        }


def _concatenate(root: Path, paths: list[str]) -> torch.Tensor:
    blob = FILE_SEPARATOR.join((root / p).read_bytes() for p in paths)
    # bytearray: torch.frombuffer wants a writable buffer to avoid a warning.
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)


def load_corpus(root: Path | str | None = None, val_fraction: float = 0.05) -> ByteCorpus:
    """Read the standard library (or any directory of ``.py`` files) into a :class:`ByteCorpus`.

    Raises ValueError when either split comes out empty (too few files under ``root``).
    """
    root = stdlib_root() if root is None else Path(root)
    train_files, val_files = split_files(list_source_files(root), val_fraction)
    if not train_files or not val_files:
        raise ValueError(
            f"corpus under {root} split into {len(train_files)} train and {len(val_files)} validation "
            "files; both need at least one (point root at a directory with more .py files)"
        )
    return ByteCorpus(
        train=_concatenate(root, train_files),
        val=_concatenate(root, val_files),
        train_files=tuple(train_files),
        val_files=tuple(val_files),
        root=str(root),
    )


def sample_windows(data: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` windows of ``length`` consecutive bytes at uniformly random offsets.

    Args:
        data: 1-D uint8 tensor.
        generator: CPU generator; the same seed gives the same windows in the same order.

    Returns:
        int64 tensor of shape ``[count, length]`` (token ids in [0, 256)).
    """
    if data.numel() <= length:
        raise ValueError(f"corpus split has {data.numel()} bytes; windows of {length} need more")
    starts = torch.randint(0, data.numel() - length + 1, (count,), generator=generator)
    index = starts[:, None] + torch.arange(length)
    return data[index].long()


def fixed_windows(data: torch.Tensor, count: int, length: int, seed: int = 0) -> torch.Tensor:
    """A fixed evaluation set: :func:`sample_windows` with its own seeded generator."""
    return sample_windows(data, count, length, torch.Generator().manual_seed(seed))
