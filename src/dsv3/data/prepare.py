"""`dsv3 prepare`: documents -> tokenizer + token shards + document offsets + train/validation split.

Same inputs and options give the same output, byte for byte: inputs are read in a fixed order, the split is
drawn from a seeded generator, batches are encoded in order, and nothing time- or path-dependent is written.
The directory is built next to ``out`` under a temporary name and renamed into place only when complete.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dsv3.data import shards, sources, stats, tokenizer as tk
from dsv3.errors import UserError

DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard: large files, few of them
BATCH_DOCS = 512                # documents per encode_batch call
BATCH_CHARS = 8 << 20           # ... or fewer when documents are long, to bound memory


@dataclass
class PrepareOptions:
    """Everything `dsv3 prepare` can be told, with its defaults."""

    vocab_size: int | None = 8192          # train a BPE of this size ...
    tokenizer: str | None = None           # ... or load this tokenizer.json (path, directory or 'deepseek-v3')
    eos_token: str | None = None
    val_fraction: float = 0.01
    seed: int = 0
    extensions: Sequence[str] = sources.DEFAULT_EXTENSIONS
    read: sources.ReadOptions = field(default_factory=sources.ReadOptions)
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    force: bool = False
    progress: bool = True


def validation_indices(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the documents that go to validation: round(n * fraction) of them, seeded.

    At least one when the fraction is positive and there are two or more documents, so a small corpus
    still gets a validation split; never all of them, so training always has data.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    k = int(round(n_docs * val_fraction))
    if val_fraction > 0 and n_docs >= 2:
        k = max(k, 1)
    k = min(k, n_docs - 1)
    rng = np.random.default_rng([seed, 0x5B1D])  # a stream of its own, not shared with the loader's shuffles
    return np.sort(rng.permutation(n_docs)[:k])


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} already exists and is not empty; pass --force to replace it or choose another --out")


def _documents(srcs: list[sources.Source], read: sources.ReadOptions) -> Iterator[str]:
    for src in srcs:
        yield from sources.iter_documents(src, read)


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def _build_tokenizer(opts: PrepareOptions, train_texts) -> tuple[str, object, bool]:
    """(tokenizer.json text, Tokenizer, trained?) from either --tokenizer or --vocab-size."""
    if opts.tokenizer:
        path = tk.resolve_tokenizer_path(opts.tokenizer)
        tok = tk.load_tokenizer(path)
        # Copy the user's file verbatim, so its sha256 matches the original file.
        return path.read_bytes().decode("utf-8"), tok, False
    tok = tk.train_bpe(train_texts, opts.vocab_size, opts.eos_token or tk.DEFAULT_EOS)
    return tk.tokenizer_json(tok), tok, True


def prepare(inputs: Sequence[str], out: str | Path, opts: PrepareOptions | None = None) -> dict:
    """Tokenize ``inputs`` into the data directory ``out``; returns the written meta.json content."""
    opts = opts or PrepareOptions()
    out = Path(out)
    _check_out(out, opts.force)
    if opts.shard_tokens < 1:
        raise UserError(f"--shard-tokens {opts.shard_tokens} must be positive")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    srcs = sources.expand_inputs(list(inputs), tuple(opts.extensions), exclude=(out, tmp))
    n_docs = sum(sources.count_documents(s, opts.read) for s in srcs)
    if n_docs == 0:
        raise UserError("the inputs hold no documents (empty .jsonl/.parquet files?); pass files with text")
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[validation_indices(n_docs, opts.val_fraction, opts.seed)] = True

    out.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        meta = _write(tmp, srcs, n_docs, is_val, opts)
        _install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _write(tmp: Path, srcs, n_docs: int, is_val: np.ndarray, opts: PrepareOptions) -> dict:
    nonempty = 0

    def train_texts():
        nonlocal nonempty
        for i, text in enumerate(_documents(srcs, opts.read)):
            if not is_val[i] and text:
                nonempty += 1
                yield text

    with _progress(opts.progress) as bar:
        train_task = None if opts.tokenizer else bar.add_task("training BPE tokenizer", total=None)
        tok_text, tok, trained = _build_tokenizer(opts, train_texts())
        if train_task is not None:
            bar.update(train_task, total=1, completed=1)
        if trained and nonempty == 0:
            raise UserError("all documents are empty; pass files with text")
        eos_token, eos_id = tk.find_eos(tok, opts.eos_token)
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        dtype = shards.token_dtype(vocab_size)
        (tmp / shards.TOKENIZER).write_text(tok_text, encoding="utf-8")

        writers = {name: shards.ShardWriter(tmp, name, dtype, opts.shard_tokens, vocab_size)
                   for name in shards.SPLITS}
        task = bar.add_task("tokenizing documents", total=n_docs)
        index = 0
        for batch in _batches(_documents(srcs, opts.read)):
            encoded = list(tk.encode_batch(tok, batch))
            for split_name, want_val in (("train", False), ("validation", True)):
                # Empty documents (no tokens) are dropped: they would only add a lone EOS.
                docs = [ids for j, ids in enumerate(encoded) if ids and is_val[index + j] == want_val]
                writers[split_name].add_batch(docs)
            index += len(batch)
            bar.advance(task, len(batch))

    split_meta = {}
    for name, writer in writers.items():
        entry = writer.finish()
        counts = writer.counts.copy()
        counts[eos_id] += entry["documents"]  # the loader puts one EOS after every document
        entry["unigram_entropy_nats"] = round(stats.entropy_nats(counts), 6)
        split_meta[name] = entry
    if split_meta["train"]["tokens"] == 0:
        raise UserError("no document produced any token (all empty?); pass files with text")

    tok_path = tmp / shards.TOKENIZER
    meta = {
        "format": shards.FORMAT,
        "version": shards.VERSION,
        "tokenizer": {"file": shards.TOKENIZER, "sha256": shards.sha256_file(tok_path),
                      "bytes": tok_path.stat().st_size, "vocab_size": vocab_size, "eos_token": eos_token,
                      "eos_id": eos_id, "trained": trained},
        "dtype": dtype.name,
        "seed": opts.seed,
        "val_fraction": opts.val_fraction,
        "input_files": len(srcs),
        "splits": split_meta,
    }
    shards.write_json(tmp / shards.META, meta)
    return meta


def _install(tmp: Path, out: Path) -> None:
    """Put the finished directory at ``out``: a rename, so readers never see a half-written dataset."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)  # existence and --force were checked before the (long) build
        try:
            tmp.rename(out)
        except OSError:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
