"""dsv3.data: documents -> token shards -> packed, resumable batches.

Modules (one job each; nothing is imported here so `dsv3 prepare` does not pay for torch):

- ``sources``        find input files (files, directories, globs) and read documents (text, .jsonl, .parquet)
- ``tokenizer``      train a byte-level BPE or load a tokenizer.json; find the EOS token
- ``shards``         on-disk format (token shards, offsets, meta.json with sha256) and ``TokenDataset``
- ``prepare``        ``prepare(inputs, out, PrepareOptions)``: the `dsv3 prepare` pipeline, atomic and deterministic
- ``packing``        ``EpochLayout``: documents + EOS packed into windows of S+1 tokens, per (seed, epoch)
- ``loader``         ``PackedLoader`` (training: shuffled, DP-sharded, resumable, prefetching) and
                     ``validation_batches`` (fixed order)
- ``stats``          ``unigram_entropy(data_dir, split)`` in nats per token
- ``default_corpus`` ``prepare_default_corpus()``: the interpreter's stdlib sources, prepared once and cached
- ``synthetic``      a small deterministic corpus for tests and demos
- ``cli``            the `prepare` verb
"""
