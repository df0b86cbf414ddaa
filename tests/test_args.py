"""ModelArgs: the real shapes in configs/, and one clear error per kind of bad params.json."""

import json

import pytest

from mistral import MistralError, ModelArgs
from tests.helpers import CONFIGS, tiny


def test_real_configs_hold_the_published_shapes():
    v01, v02, v03 = (tiny(f"mistral-7b-v0.{i}") for i in (1, 2, 3))
    assert (v01.sliding_window, v01.rope_theta, v01.vocab_size) == (4096, 1e4, 32000)
    assert (v02.sliding_window, v02.rope_theta, v02.vocab_size) == (None, 1e6, 32000)
    assert (v03.sliding_window, v03.rope_theta, v03.vocab_size) == (None, 1e6, 32768)
    m7, m22 = tiny("mixtral-8x7b"), tiny("mixtral-8x22b")
    assert (m7.moe.num_experts, m7.moe.num_experts_per_tok, m7.dim) == (8, 2, 4096)
    assert (m22.dim, m22.n_layers, m22.n_heads, m22.hidden_dim) == (6144, 56, 48, 16384)
    assert v01.n_rep == 4


def test_params_round_trip(tmp_path):
    for path in CONFIGS.glob("*.json"):
        args = ModelArgs.from_file(path)
        out = tmp_path / path.name
        out.write_text(json.dumps(args.to_params()))
        assert ModelArgs.from_file(out) == args


def params(**change):
    p = tiny("tiny-moe").to_params()
    p.update(change)
    return {k: v for k, v in p.items() if v is not None}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dim": None}, "missing field(s) dim"),
        ({"colour": "red"}, "unknown field(s) colour"),
        ({"n_kv_heads": 3}, "n_heads (4) is not divisible by n_kv_heads (3)"),
        ({"head_dim": 15}, "head_dim must be even"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"norm_eps": -1.0}, "norm_eps must be a positive number"),
        ({"sliding_window": 0}, "sliding_window must be a positive integer"),
        ({"moe": {"num_experts": 2, "num_experts_per_tok": 3}}, "num_experts_per_tok <="),
        ({"moe": {"num_experts": 2}}, "moe: missing ['num_experts_per_tok']"),
    ],
)
def test_bad_params_name_the_problem(change, message):
    with pytest.raises(MistralError) as e:
        ModelArgs.from_params(params(**change))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_rope_theta_uses_the_original_rule_and_says_so():
    p = params()
    del p["rope_theta"]
    with pytest.warns(UserWarning, match="no rope_theta"):
        assert ModelArgs.from_params(p).rope_theta == 1e4


def test_head_dim_is_taken_as_declared():
    args = tiny("tiny-window")
    assert args.head_dim == 24 != args.dim // args.n_heads
