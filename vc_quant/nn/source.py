"""Where the stored record of a resident weight lives, so a re-save writes it byte for byte.

* :class:`InMemoryRecord` — the record itself (after quantize-on-load: there is no file yet).
* :class:`CheckpointRecord` — a reference into the checkpoint the model was loaded from; the
  record is read back (memory-mapped) only when it is saved again, and refused if the file
  no longer holds the record that was loaded (its CRC32 is remembered).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vc_quant import format as fmt
from vc_quant.codec.record import EncodedTensor
from vc_quant.errors import VcCorruptDataError
from vc_quant.safetensors_io import read_header, read_tensor


class RecordSource:
    """The stored record of one weight: ``nbytes`` stored, ``held_bytes`` kept in memory, ``load()``."""

    nbytes: int
    held_bytes: int

    def load(self) -> EncodedTensor:
        raise NotImplementedError


class InMemoryRecord(RecordSource):
    def __init__(self, enc: EncodedTensor) -> None:
        self.enc = enc
        self.nbytes = self.held_bytes = enc.nbytes

    def load(self) -> EncodedTensor:
        return self.enc


@dataclass
class CheckpointRecord(RecordSource):
    """Entries of ``key`` in the shards of a checkpoint (``files``: entry name → shard path)."""

    key: str
    files: dict[str, Path]
    crc32: int
    nbytes: int
    held_bytes: int = 0

    def load(self) -> EncodedTensor:
        try:
            tensors = {}
            for entry, path in self.files.items():
                # read into memory of our own: the save that asked for it may overwrite the file
                tensors[entry] = read_tensor(path, read_header(path).tensors[entry])
        except (OSError, KeyError, VcCorruptDataError) as exc:
            raise VcCorruptDataError(
                f"{self.key}: cannot read its record back from {sorted({str(p) for p in self.files.values()})} "
                f"({exc}); the checkpoint this model was loaded from changed or was removed"
            ) from exc
        enc = fmt.from_state_dict(self.key, tensors)
        if enc.meta["crc32"] != self.crc32:
            raise VcCorruptDataError(
                f"{self.key}: the checkpoint this model was loaded from now holds a different record; "
                "it was overwritten since loading"
            )
        return enc
