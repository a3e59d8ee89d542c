"""Reading webdataset shards (the MindEye formats): tar files whose members are grouped into samples by key."""

from __future__ import annotations

import io
import posixpath
import re
import tarfile
from pathlib import Path

import numpy as np

from brainmclip.errors import InvalidInputError, MissingInputError

__all__ = ["Shards", "tar_files", "decode_jpeg", "npy_bytes"]


def split_member(name: str) -> tuple[str, str]:
    """webdataset naming: the key is the path up to the first dot of the file name; the rest is the extension."""
    name = name[2:] if name.startswith("./") else name
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext


def npy_bytes(data: bytes, where: str, what: str) -> np.ndarray:
    """The array of a ``.npy`` member, or a one-line error naming the sample."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInputError(f"{where}: not a readable .npy array ({message}); expected {what}") from None


class Shards:
    """The samples of a split's webdataset tar files, grouped by key (tar files stay open)."""

    def __init__(self, paths: list[Path], what: str):
        self.what = what
        self.tars: dict[Path, tarfile.TarFile] = {}
        self.samples: dict[str, tuple[Path, dict[str, tarfile.TarInfo]]] = {}
        try:
            for path in paths:
                self._index(path)
        except BaseException:
            self.close()
            raise

    def _index(self, path: Path) -> None:
        try:
            tar = tarfile.open(path, "r:*")  # noqa: SIM115 (kept open for reads; closed by close())
            self.tars[path] = tar
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InvalidInputError(f"{path}: not a readable tar file ({exc}); expected {self.what}") from None
        grouped: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in members:
            if not member.isfile():
                continue
            key, ext = split_member(member.name)
            if ext:
                grouped.setdefault(key, {})[ext] = member
        for key, exts in grouped.items():
            if key in self.samples:
                raise InvalidInputError(f"{path}: sample {key!r} is also in {self.samples[key][0]}; expected each sample "
                                 "once per split")
            self.samples[key] = (path, exts)

    def sorted_keys(self) -> list[str]:
        return sorted(self.samples)

    def where(self, key: str) -> str:
        return f"{self.samples[key][0]}: sample {key!r}"

    def has(self, key: str, ext: str) -> bool:
        return ext in self.samples[key][1]

    def read(self, key: str, ext: str) -> bytes:
        path, members = self.samples[key]
        if ext not in members:
            raise InvalidInputError(f"{path}: sample {key!r} has no '{ext}' member (it has {sorted(members)}); "
                             f"expected {self.what}")
        try:
            handle = self.tars[path].extractfile(members[ext])
            return handle.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InvalidInputError(f"{path}: cannot read {members[ext].name} ({exc}); truncated tar file?") from None

    def npy(self, key: str, ext: str) -> np.ndarray:
        return npy_bytes(self.read(key, ext), self.where(key), f"'{ext}' in {self.what}")

    def close(self) -> None:
        for tar in self.tars.values():
            tar.close()
        self.tars.clear()


def tar_files(folder: Path, subject: int, what: str, example: str) -> list[Path]:
    """The ``*.tar`` files of a folder; names that mention another subject (``subjNN``) are skipped."""
    if not folder.is_dir():
        raise MissingInputError(f"{folder}: folder missing ({what}); expected {example}")
    paths = []
    for path in sorted(folder.glob("*.tar")):
        tag = re.search(r"subj0*(\d+)", path.name)
        if tag is None or int(tag.group(1)) == subject:
            paths.append(path)
    if not paths:
        raise MissingInputError(f"{folder}: no .tar files for subject {subject} ({what}); expected {example}")
    return paths


def decode_jpeg(data: bytes, where: str) -> np.ndarray:
    """A ``jpg`` member as uint8 (H, W, 3) RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidInputError(f"{where}: 'jpg' is not a readable image ({exc})") from None
