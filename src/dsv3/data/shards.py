"""On-disk format of a prepared dataset: token shards, document offsets and meta.json.

Layout of a data directory (one per `dsv3 prepare` run)::

    meta.json                  format, tokenizer (sha256, vocab size, EOS), dtype, per-split counts, file list
    tokenizer.json             copy of the tokenizer used
    {split}.offsets.npy        int64 [documents + 1]: where each document starts in the split's token stream
    {split}-00000.bin, ...     raw tokens (uint16 if vocab < 65536 else uint32), the split's documents
                               concatenated in order WITHOUT separators; a document may cross a shard edge

Every file is listed in meta.json with its size and sha256, so a truncated or corrupted file is caught when
the dataset is opened.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsv3.errors import UserError

FORMAT = "dsv3-tokens"
VERSION = 1
META = "meta.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "validation")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    """JSON with sorted keys and a trailing newline: byte-identical for equal content."""
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


class ShardWriter:
    """Appends documents of one split to fixed-size token shards, hashing as it writes."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, vocab_size: int):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens = int(shard_tokens)
        self.offsets = [0]
        self.counts = np.zeros(vocab_size, dtype=np.int64)  # unigram counts, for the entropy baseline
        self.shards: list[dict] = []
        self._file = None
        self._hash = None
        self._in_shard = 0

    def _open_next(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0, "bytes": 0, "sha256": ""})

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            entry = self.shards[-1]
            entry.update(tokens=self._in_shard, bytes=self._in_shard * self.dtype.itemsize,
                         sha256=self._hash.hexdigest())
            self._file = None

    def add_batch(self, docs: list[list[int]]) -> None:
        """Append documents' token ids (their EOS is NOT stored; the loader inserts separators).

        Works on a batch so the unigram count and the write happen once per batch, not once per document.
        """
        if not docs:
            return
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        arr = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
        self.counts += np.bincount(arr, minlength=len(self.counts))[: len(self.counts)]
        self.offsets.extend((self.offsets[-1] + np.cumsum(lengths)).tolist())
        arr = arr.astype(self.dtype)
        while arr.size:
            if self._file is None or self._in_shard >= self.shard_tokens:
                self._close_current()
                self._open_next()
            take = arr[: self.shard_tokens - self._in_shard]
            data = take.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._in_shard += take.size
            arr = arr[take.size:]

    def finish(self) -> dict:
        """Close the last shard, write the offsets file, and return this split's meta.json entry."""
        self._close_current()
        offsets_name = f"{self.split}.offsets.npy"
        np.save(self.directory / offsets_name, np.asarray(self.offsets, dtype=np.int64))
        offsets_path = self.directory / offsets_name
        return {
            "documents": len(self.offsets) - 1,
            "tokens": int(self.offsets[-1]),
            "offsets": {"file": offsets_name, "bytes": offsets_path.stat().st_size,
                        "sha256": sha256_file(offsets_path)},
            "shards": self.shards,
        }


def _check_file(directory: Path, entry: dict, verify: bool) -> Path:
    path = directory / entry["file"]
    fix = f"re-run `dsv3 prepare` to rebuild {directory}"
    if not path.is_file():
        raise UserError(f"data file {path} is missing; {fix}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise UserError(f"data file {path} has {size} bytes, expected {entry['bytes']} (truncated or modified); {fix}")
    if verify and sha256_file(path) != entry["sha256"]:
        raise UserError(f"data file {path} is corrupt (sha256 mismatch); {fix}")
    return path


@dataclass
class SplitTokens:
    """Read-only view of one split: documents addressed by index, tokens read through memory maps."""

    name: str
    offsets: np.ndarray          # int64 [documents + 1]
    shards: list[np.ndarray]     # memmaps
    shard_starts: np.ndarray     # int64 [len(shards) + 1], token offset of each shard in the split's stream

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc_lengths(self) -> np.ndarray:
        """Token count of every document (int64)."""
        return np.diff(self.offsets)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's concatenated stream, as int64, across shard edges."""
        parts = []
        k = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        while start < stop:
            local = start - int(self.shard_starts[k])
            n = min(stop - start, len(self.shards[k]) - local)
            parts.append(self.shards[k][local: local + n])
            start += n
            k += 1
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(parts).astype(np.int64)

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (without EOS)."""
        return self.read(int(self.offsets[i]), int(self.offsets[i + 1]))


class TokenDataset:
    """A prepared data directory, checked against its meta.json when opened.

    ``verify=True`` hashes every file (catches corruption); ``verify=False`` only checks sizes (catches
    truncation) for a faster open of very large datasets.
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            raise UserError(f"{self.path} is not a prepared data directory (no {META}); "
                            f"run `dsv3 prepare DOCS --out {self.path}`")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{meta_path} is not valid JSON; re-run `dsv3 prepare` to rebuild {self.path}") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise UserError(f"{self.path} was written by an incompatible version (format "
                            f"{self.meta.get('format')} v{self.meta.get('version')}); re-run `dsv3 prepare`")
        tok = self.meta["tokenizer"]
        _check_file(self.path, {"file": TOKENIZER, "bytes": tok["bytes"], "sha256": tok["sha256"]}, verify)
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size: int = tok["vocab_size"]
        self.eos_id: int = tok["eos_id"]
        self.eos_token: str = tok["eos_token"]
        self.tokenizer_sha256: str = tok["sha256"]
        self._splits: dict[str, SplitTokens] = {}
        for name, entry in self.meta["splits"].items():
            offsets = np.load(_check_file(self.path, entry["offsets"], verify))
            shards, starts = [], [0]
            for shard in entry["shards"]:
                p = _check_file(self.path, shard, verify)
                shards.append(np.memmap(p, dtype=self.dtype, mode="r"))
                starts.append(starts[-1] + shard["tokens"])
            if starts[-1] != int(offsets[-1]) or len(offsets) != entry["documents"] + 1:
                raise UserError(f"{self.path}: split {name} offsets do not match its shards; re-run `dsv3 prepare`")
            self._splits[name] = SplitTokens(name, offsets, shards, np.asarray(starts, dtype=np.int64))

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    def split(self, name: str) -> SplitTokens:
        """The named split ("train" or "validation")."""
        if name not in self._splits:
            raise UserError(f"{self.path} has no split {name!r} (has: {', '.join(self._splits)})")
        return self._splits[name]

    def load_tokenizer(self):
        """The tokenizers.Tokenizer this data was encoded with."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path))
