"""Config validation names the bad field; presets are exact; HF spellings map 1:1."""
import pytest

from dsv3.config import PRESETS, ModelConfig, preset
from dsv3.errors import UserError


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_roundtrip_through_hf_dict(name):
    c = preset(name)
    back = ModelConfig.from_dict(c.to_hf_dict(), strict=False)
    assert back == c


def test_v3_softmax_scale_matches_design():
    assert preset("v3").softmax_scale == pytest.approx(0.135234, abs=5e-7)
    assert preset("small").softmax_scale == pytest.approx(192 ** -0.5)


def test_tiny_and_small_keep_v3_mechanisms():
    for name in ("tiny", "small"):
        c = preset(name)
        assert c.scoring_func == "sigmoid" and c.topk_method == "noaux_tc" and c.n_group > 1
        assert c.q_lora_rank and c.n_shared_experts == 1 and c.num_nextn_predict_layers == 1


@pytest.mark.parametrize("changes, field", [
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"num_key_value_heads": 1}, "num_key_value_heads"),
    ({"mtp_hidden_norm": "middle"}, "mtp_hidden_norm"),
    ({"hidden_size": "big"}, "hidden_size"),
])
def test_validation_names_the_field(changes, field):
    d = {**preset("tiny").to_dict(), **changes}
    with pytest.raises(UserError, match=field):
        ModelConfig.from_dict(d)


def test_unknown_key_and_preset_are_user_errors():
    with pytest.raises(UserError, match="unknown key model.hiden_size"):
        ModelConfig.from_dict({"hiden_size": 3})
    with pytest.raises(UserError, match="unknown model preset 'v4'.*tiny"):
        preset("v4")


@pytest.mark.parametrize("override, field", [('train.fp8_modules="experts,router"', "fp8_modules"),
                                             ('train.fp8_modules=""', "fp8_modules"),
                                             ('train.fp8_backend="cublas"', "fp8_backend")])
def test_fp8_options_are_validated(override, field):
    from dsv3.train.config import apply_overrides, resolve

    with pytest.raises(UserError, match=field):
        resolve(apply_overrides({}, [override]))


def test_compile_mode_is_validated():
    """train.compile_mode takes torch.compile's modes by name; anything else is one clear UserError."""
    from dsv3.train.config import COMPILE_MODES, apply_overrides, resolve

    cfg = resolve(apply_overrides({}, ['train.compile_mode="reduce-overhead"']))
    assert cfg.train.compile_mode == "reduce-overhead"
    assert resolve(apply_overrides({}, [])).train.compile_mode == "default" and "default" in COMPILE_MODES
    with pytest.raises(UserError, match="train.compile_mode = 'cudagraphs' is invalid: use one of 'default'"):
        resolve(apply_overrides({}, ['train.compile_mode="cudagraphs"']))


def test_cudagraph_replay_failure_becomes_one_user_error_line():
    """The experimental CUDA-graph compile modes: torch's replay error becomes a UserError naming the setting and
    the fix; other errors, and the same error under compile_mode 'default', pass through."""
    from dsv3.train.cli import _cudagraph_user_error
    from dsv3.train.config import apply_overrides, resolve

    torch_error = RuntimeError("Error: accessing tensor output of CUDAGraphs that has been overwritten by a "
                               "subsequent run. Stack trace: ...\nmore")
    cg = resolve(apply_overrides({}, ['train.compile_mode="reduce-overhead"']))
    err = _cudagraph_user_error(torch_error, cg)
    assert isinstance(err, UserError) and "\n" not in str(err)
    assert "train.compile_mode = 'reduce-overhead'" in str(err) and "set train.compile_mode = 'default'" in str(err)
    assert _cudagraph_user_error(RuntimeError("CUDA out of memory"), cg) is None
    assert _cudagraph_user_error(torch_error, resolve(apply_overrides({}, []))) is None
