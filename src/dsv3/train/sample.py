"""The greedy sample printed at the end of `dsv3 train` (uses dsv3.infer.generate)."""
from __future__ import annotations

import torch

from dsv3.data.shards import TokenDataset


def greedy_sample(model, data_dir, prompt: str = "def ", max_new_tokens: int = 64) -> str:
    """Prompt + greedy continuation, decoded with the data's tokenizer."""
    from dsv3.infer.generate import generate

    ds = TokenDataset(data_dir, verify=False)
    tok = ds.load_tokenizer()
    ids = tok.encode(prompt).ids or [ds.eos_id]
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    was_training = model.training
    try:
        out = generate(model, input_ids, max_new_tokens, temperature=0.0, eos_id=ds.eos_id)
    finally:
        model.train(was_training)
    new = [i for i in out[0].tolist()]
    return tok.decode(new, skip_special_tokens=True)
