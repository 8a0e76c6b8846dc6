"""Generation with a KV cache against full recomputation; export/import verbs round-trip."""
import torch

from dsv3.cli import main
from dsv3.config import ModelConfig
from dsv3.hf import save_pretrained
from dsv3.hf_cli import load_any_checkpoint
from dsv3.infer.generate import generate, sample_next
from dsv3.model import DeepseekV3

CFG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                  topk_group=1, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8,
                  v_head_dim=8, first_k_dense_replace=1, rope_scaling=None, initializer_range=0.2,
                  max_position_embeddings=64)


def test_greedy_generation_with_cache_equals_recomputation():
    torch.manual_seed(0)
    m = DeepseekV3(CFG.validate()).eval()
    prompt = torch.randint(0, 50, (2, 5))
    for kind in ("latent", "naive"):
        out = generate(m, prompt, 12, temperature=0.0, cache_kind=kind)
        seq = prompt
        with torch.no_grad():
            for _ in range(12):
                seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out, seq), kind


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0.7, g).item() for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are never drawn


def test_import_export_verbs_roundtrip(tmp_path):
    torch.manual_seed(1)
    m = DeepseekV3(CFG.validate()).eval()
    save_pretrained(m, tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "native")]) == 0
    assert main(["export", str(tmp_path / "native"), str(tmp_path / "hf2"), "--dtype", "fp32"]) == 0
    back, _ = load_any_checkpoint(tmp_path / "hf2")
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
