"""`dsv3 prepare`: the command-line face of dsv3.data.prepare."""
from __future__ import annotations

import argparse
import sys

from dsv3.data import sources
from dsv3.data.prepare import DEFAULT_SHARD_TOKENS, PrepareOptions, prepare


def register(subparsers) -> None:
    """Add the `prepare` verb."""
    p = subparsers.add_parser(
        "prepare", help="tokenize documents into a packed, memory-mapped dataset",
        description="Tokenize text files, directories, globs, .jsonl and .parquet files into DATA_DIR: token "
                    "shards, document offsets, a train/validation split, tokenizer.json and meta.json.")
    p.add_argument("docs", nargs="+", metavar="DOCS", help="files, directories (recursive) or quoted globs")
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="output directory")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--vocab-size", type=int, default=None,
                     help="train a byte-level BPE with this many tokens (default 8192)")
    tok.add_argument("--tokenizer", default=None, metavar="PATH",
                     help="use an existing tokenizer.json (a path, a directory, or 'deepseek-v3' for DeepSeek-V3's)")
    p.add_argument("--eos-token", default=None,
                   help="token that ends a document (default: <｜end▁of▁sentence｜> or a known EOS of the tokenizer)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--ext", default=",".join(sources.DEFAULT_EXTENSIONS),
                   help="comma-separated extensions taken from directories (default %(default)s)")
    p.add_argument("--jsonl-field", default="text", help="field of each .jsonl record holding the text")
    p.add_argument("--parquet-column", default="text", help="column of .parquet files holding the text")
    p.add_argument("--encoding-errors", choices=["strict", "replace", "ignore"], default="strict",
                   help="what to do with invalid UTF-8 (default: stop with an error)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `dsv3 prepare` from parsed arguments; prints a one-paragraph summary."""
    opts = PrepareOptions(
        vocab_size=args.vocab_size if args.vocab_size is not None else (None if args.tokenizer else 8192),
        tokenizer=args.tokenizer,
        eos_token=args.eos_token,
        val_fraction=args.val_fraction,
        seed=args.seed,
        extensions=tuple(e for e in args.ext.split(",") if e),
        read=sources.ReadOptions(args.jsonl_field, args.parquet_column, args.encoding_errors),
        shard_tokens=args.shard_tokens,
        force=args.force,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    meta = prepare(args.docs, args.out, opts)
    tok = meta["tokenizer"]
    print(f"wrote {args.out}: vocab {tok['vocab_size']} ({meta['dtype']}), eos {tok['eos_token']} = {tok['eos_id']}")
    if opts.vocab_size and tok["vocab_size"] < opts.vocab_size:
        print(f"  note: the corpus only supported {tok['vocab_size']} of the {opts.vocab_size} tokens asked for")
    for name, s in meta["splits"].items():
        print(f"  {name}: {s['documents']} documents, {s['tokens']} tokens, {len(s['shards'])} shards, "
              f"unigram entropy {s['unigram_entropy_nats']:.3f} nats/token")
    return 0
