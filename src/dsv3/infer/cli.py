"""`dsv3 generate --ckpt DIR --prompt TEXT`: sample from a run, a native or a Hugging Face checkpoint."""
from __future__ import annotations

import argparse

import torch

from dsv3.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint with a KV cache",
                       description="Sample from a run directory, a `dsv3 import` directory or a Hugging Face "
                                   "checkpoint directory. Decoding uses the absorbed-MLA latent cache.")
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint dir or HF checkpoint dir")
    p.add_argument("--prompt", default="", help="text to continue (default: start from EOS)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the checkpoint's")
    p.add_argument("--cache", choices=["latent", "naive"], default="latent", help="KV cache form (default latent)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsv3.hf_cli import load_any_checkpoint
    from dsv3.infer.generate import generate

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens} is invalid: use a positive number")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_any_checkpoint(args.ckpt, tokenizer_path=args.tokenizer)
    if tokenizer is None:
        raise UserError(f"no tokenizer.json found for {args.ckpt}: pass --tokenizer PATH")
    model = model.to(device)
    from dsv3.data.tokenizer import find_eos

    try:
        eos = find_eos(tokenizer)[1]
    except UserError:
        eos = model.config.eos_token_id
    ids = tokenizer.encode(args.prompt).ids if args.prompt else []
    if not ids:
        ids = [eos]
    x = torch.tensor([ids], device=device)
    out = generate(model, x, args.max_tokens, temperature=args.temperature, top_p=args.top_p, eos_id=eos,
                   cache_kind=args.cache, seed=args.seed)
    new = [t for t in out[0, len(ids):].tolist()]
    if eos in new:
        new = new[: new.index(eos)]
    print(args.prompt + tokenizer.decode(new))
    return 0

