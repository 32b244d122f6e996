"""Reading a saved vc checkpoint without trusting it: headers first, then entries on demand.

:class:`Checkpoint` opens the shards' safetensors headers only (names, dtypes, shapes,
metadata), so sizes are known and checked before any tensor is read. It finds what
does not fit together — shards of different saves, an index that names tensors no
shard holds, records whose entries are missing or oversized — and reads records and
plain tensors (with their CRC32 from the shard metadata) for the loader and for
``vc-quant verify``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vc_quant import format as fmt
from vc_quant.codec.record import MAX_META_BYTES, EncodedTensor
from vc_quant.errors import VcCorruptDataError
from vc_quant.safetensors_io import TensorInfo, read_header, read_tensor

INDEX_NAME, SINGLE_NAME = "model.safetensors.index.json", "model.safetensors"


@dataclass(frozen=True)
class Entry:
    shard: Path
    info: TensorInfo

    @property
    def dtype(self) -> str:  # safetensors dtype name, e.g. "U8", "F16"
        return self.info.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.info.end - self.info.start


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise VcCorruptDataError(f"{path}: {what} cannot be read ({exc})") from exc
    if not isinstance(data, dict):
        raise VcCorruptDataError(f"{path}: {what} is not a JSON object")
    return data


class Checkpoint:
    """The shards of one checkpoint, their headers and their metadata."""

    def __init__(self, files: list[Path], weight_map: dict[str, str] | None = None) -> None:
        self.files = [Path(f) for f in files]
        self.weight_map = weight_map
        self.entries: dict[str, Entry] = {}
        self.shard_meta: dict[Path, dict[str, str]] = {}
        self.problems: list[str] = []
        for shard in self.files:
            if not shard.is_file():
                raise VcCorruptDataError(f"{shard}: shard is missing (deleted, or an interrupted save)")
            header = read_header(shard)
            self.shard_meta[shard] = header.metadata
            for key, info in header.tensors.items():
                if key in self.entries:
                    self.problems.append(f"{key}: stored in two shards ({self.entries[key].shard.name}, {shard.name})")
                self.entries[key] = Entry(shard, info)
        self._check_index()
        self._check_records()

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """The checkpoint in folder ``path`` (single file or sharded with an index)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a checkpoint folder")
        index = path / INDEX_NAME
        if index.exists():
            weight_map = read_json(index, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise VcCorruptDataError(f"{index}: has no valid 'weight_map'")
            names = sorted(set(weight_map.values()))
            if any(Path(n).name != n for n in names):  # untrusted: never leave the folder
                raise VcCorruptDataError(f"{index}: shard names must be plain file names")
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise VcCorruptDataError(f"{path}: shard(s) {missing} named in the index are missing")
            return cls([path / n for n in names], weight_map)
        if (path / SINGLE_NAME).is_file():
            return cls([path / SINGLE_NAME])
        raise FileNotFoundError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}")

    # --- structure -----------------------------------------------------------------------------
    def _check_index(self) -> None:
        if self.weight_map is None:
            return
        for key, shard in self.weight_map.items():
            entry = self.entries.get(key)
            if entry is None:
                self.problems.append(f"{key}: listed in the index but in no shard")
            elif entry.shard.name != shard:
                self.problems.append(f"{key}: the index says {shard}, found in {entry.shard.name}")
        extra = sorted(set(self.entries) - set(self.weight_map))
        if extra:
            self.problems.append(f"{len(extra)} stored tensor(s) not in the index, e.g. {extra[0]}")

    def _check_records(self) -> None:
        for key in self.quantized_keys():
            bitstream = self.entries.get(key)
            meta = self.entries[key + fmt.META_SUFFIX]
            if bitstream is None:
                self.problems.append(f"{key}: metadata without a bitstream")
                continue
            if meta.dtype != "U8" or len(meta.shape) != 1 or meta.shape[0] > MAX_META_BYTES:
                self.problems.append(f"{key}: metadata entry is {meta.dtype} {list(meta.shape)}, expected U8 "
                                     f"of <= {MAX_META_BYTES} bytes")  # fmt: skip
            if bitstream.dtype != "U8" or len(bitstream.shape) != 1:
                self.problems.append(f"{key}: bitstream entry is {bitstream.dtype} {list(bitstream.shape)}")
            for suffix in (fmt.COMPANIONS["center"], fmt.COMPANIONS["step"]):  # the optional col_scale may be absent
                companion = self.entries.get(key + suffix)
                if companion is None:
                    self.problems.append(f"{key}: entry {key + suffix} is missing")
                elif math.prod(companion.shape) > (1 << 24):
                    self.problems.append(f"{key}: entry {key + suffix} is implausibly large")
        for key in self.entries:
            if fmt.is_companion(key) and key.removesuffix(_suffix(key)) + fmt.META_SUFFIX not in self.entries:
                self.problems.append(f"{key}: companion entry without its record's metadata")

    def quantized_keys(self) -> list[str]:
        return sorted(k.removesuffix(fmt.META_SUFFIX) for k in self.entries if k.endswith(fmt.META_SUFFIX))

    def plain_keys(self) -> list[str]:
        quantized = set(self.quantized_keys())
        return sorted(k for k in self.entries if k not in quantized and not fmt.is_companion(k))

    def save_ids(self) -> set[str | None]:
        return {m.get(fmt.KEY_SAVE_ID) for m in self.shard_meta.values()}

    def check_save(self, save_id: str | None) -> None:
        """Raise if shards come from different saves, or from another save than ``config.json`` names."""
        ids = self.save_ids()
        if len(ids) > 1:
            raise VcCorruptDataError(
                f"{self.files[0].parent}: shards come from {len(ids)} different saves (an interrupted re-save "
                "mixed old and new files); save the model again"
            )
        (found,) = ids
        if save_id is not None and found != save_id:
            raise VcCorruptDataError(
                f"{self.files[0].parent}: config.json belongs to save {save_id}, the shards to save {found} "
                "(an interrupted re-save); save the model again"
            )

    def plain_crc(self) -> dict[str, int]:
        """``{name: crc32}`` of the plain tensors, from the shard metadata (empty for old checkpoints)."""
        out: dict[str, int] = {}
        for shard, meta in self.shard_meta.items():
            raw = meta.get(fmt.KEY_PLAIN_CRC)
            if raw is None:
                continue
            try:
                table = json.loads(raw)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise VcCorruptDataError(f"{shard}: metadata {fmt.KEY_PLAIN_CRC} is not valid JSON") from exc
            if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
                raise VcCorruptDataError(f"{shard}: metadata {fmt.KEY_PLAIN_CRC} is malformed")
            out.update(table)
        return out

    # --- reading ---------------------------------------------------------------------------------
    def record_files(self, key: str) -> dict[str, Path]:
        names = [key] + [key + s for s in fmt.COMPANIONS.values()]
        return {n: self.entries[n].shard for n in names if n in self.entries}

    def record_nbytes(self, key: str) -> int:
        return sum(self.entries[n].nbytes for n in self.record_files(key))

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        return read_tensor(entry.shard, entry.info)

    def read_record(self, key: str, verify: bool = True) -> EncodedTensor:
        """The record of ``key`` (entries may sit in different shards), checked before reading."""
        problems = [p for p in self.problems if p.startswith(key + ":")]
        if problems:
            raise VcCorruptDataError(problems[0])
        tensors = {name: self.read(name) for name in self.record_files(key)}
        return fmt.from_state_dict(key, tensors, verify=verify)


def _suffix(key: str) -> str:
    return next(s for s in fmt.COMPANIONS.values() if key.endswith(s))
