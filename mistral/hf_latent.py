"""transformers' latent-attention families (deepseek_v2, deepseek_v3, mistral4): their
config.json as ModelArgs, and the routing each one's router implements."""

from __future__ import annotations

from typing import Any

from mistral.args import ModelArgs, MoeArgs, YarnArgs
from mistral.errors import MistralError
from mistral.rope import yarn_mscale

TYPES = ("deepseek_v2", "deepseek_v3", "mistral4")
CLASSES = {
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "mistral4": "Mistral4ForCausalLM",
}
# transformers 5.24's defaults of each config class, for the routing keys a config.json may omit
DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {"n_shared_experts": 2, "first_k_dense_replace": 0, "norm_topk_prob": False},
    "deepseek_v3": {"n_shared_experts": 1, "first_k_dense_replace": 3, "norm_topk_prob": True},
    "mistral4": {"n_shared_experts": 1, "first_k_dense_replace": 0, "norm_topk_prob": True},
}
DEFAULTS["deepseek_v2"] |= {"routed_scaling_factor": 1.0, "topk_method": "greedy"}
DEFAULTS["deepseek_v3"] |= {"routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4}
DEFAULTS["mistral4"] |= {"routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1}


def routing(config: dict[str, Any]) -> dict[str, Any]:
    """The router of each type, as transformers 5 computes it: DeepSeek-V2 softmax scores,
    unnormalized (it ignores norm_topk_prob), groups by their best expert only under
    group_limited_greedy; V3 sigmoid scores plus a bias, groups by their best two; mistral4
    softmax scores, groups by their best two."""
    kind = config["model_type"]
    groups = (config.get("n_group") or 1, config.get("topk_group") or 1)
    if kind == "deepseek_v2":
        method = config.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise MistralError(f"topk_method {method!r} is not greedy or group_limited_greedy")
        if config.get("norm_topk_prob"):
            raise MistralError(
                "norm_topk_prob with deepseek_v2, which transformers and mlx-lm ignore "
                "and DeepSeek's own code applies: ambiguous, refused"
            )
        if method == "greedy":
            groups = (1, 1)
        return dict(
            scoring_func="softmax",
            norm_topk_prob=False,
            group_scoring="max",
            num_expert_groups=groups[0],
            num_expert_groups_per_tok=groups[1],
        )
    return dict(
        scoring_func="sigmoid" if kind == "deepseek_v3" else "softmax",
        norm_topk_prob=bool(config.get("norm_topk_prob", kind == "mistral4")),
        group_scoring="top2",
        num_expert_groups=groups[0],
        num_expert_groups_per_tok=groups[1],
    )


def refuse_unsupported(config: dict[str, Any]) -> None:
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise MistralError(f"{key} is not supported (the spec has no biases)")
    if config.get("moe_layer_freq", 1) != 1:
        raise MistralError(f"moe_layer_freq {config['moe_layer_freq']} is not supported (1)")
    if config["model_type"] != "deepseek_v2" and config.get("rope_interleave", True) is not True:
        raise MistralError(
            "rope_interleave false (RoPE over halves) is not supported: the spec "
            "rotates adjacent pairs"
        )


def args_from_config(config: dict[str, Any], common: dict[str, Any]) -> ModelArgs:
    """ModelArgs of a deepseek_v2, deepseek_v3 or mistral4 config.json, given the keys every
    type names alike (``common``; routing keys it leaves out: its transformers class's
    defaults). Missing keys raise KeyError, the caller names them."""
    config = DEFAULTS[config["model_type"]] | config
    refuse_unsupported(config)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    nope, rope_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"]
    # the head transformers rotates a partial_rotary_factor of: its configs fix it at the whole
    # query/key head (mistral4) or the RoPE part (deepseek), whatever head_dim says
    head_dim = nope + rope_dim if config["model_type"] == "mistral4" else rope_dim
    partial = rope.get("partial_rotary_factor", rope_dim / head_dim)
    if int(head_dim * partial) != rope_dim:
        raise MistralError(
            f"partial_rotary_factor {partial} of head_dim {head_dim} is not the RoPE part "
            f"qk_rope_head_dim ({rope_dim})"
        )
    moe = MoeArgs(
        num_experts=config["n_routed_experts"],
        num_experts_per_tok=config["num_experts_per_tok"],
        num_shared_experts=config.get("n_shared_experts") or 0,
        expert_hidden_dim=config["moe_intermediate_size"],
        first_k_dense_replace=config.get("first_k_dense_replace", 0),
        routed_scale=float(config.get("routed_scaling_factor", 1.0)),
        **routing(config),
    )
    if config["model_type"] != "mistral4":  # only mistral4 scales its queries
        common = common | {"llama_4_scaling": None}
    return ModelArgs(
        **common,
        head_dim=nope + rope_dim,
        moe=moe,
        q_lora_rank=config.get("q_lora_rank"),
        kv_lora_rank=config["kv_lora_rank"],
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=config["v_head_dim"],
    )


def model_type(args: ModelArgs) -> str:
    """The transformers type whose router is these args': deepseek_v2 (softmax, unnormalized,
    groups by their best expert), deepseek_v3 (sigmoid with a bias) or mistral4 (softmax,
    normalized, groups by their best two)."""
    m = args.moe
    if m is None or m.num_experts_per_tok == 0:
        raise MistralError(
            "transformers has latent attention only with experts (deepseek, mistral4)"
        )
    grouped = m.num_expert_groups > 1
    if len({w for w in args.layer_windows()}) > 1 or args.layer_windows()[0] is not None:
        raise MistralError("transformers' latent attention has no sliding window")
    if m.scoring_func == "sigmoid" and grouped and m.group_scoring != "top2":
        raise MistralError("transformers' deepseek_v3 scores groups by their best two experts")
    if m.scoring_func == "sigmoid":
        kind = "deepseek_v3"
    elif not m.norm_topk_prob and (m.group_scoring == "max" or not grouped):
        kind = "deepseek_v2"
    elif m.norm_topk_prob and (m.group_scoring == "top2" or not grouped):
        kind = "mistral4"
    else:
        raise MistralError("no transformers router scores groups this way with these weights")
    if kind != "mistral4" and args.llama_4_scaling is not None:
        raise MistralError(f"transformers' {kind} has no query scaling by position")
    one_original_context(args, kind)
    return kind


def one_original_context(args: ModelArgs, kind: str) -> None:
    """ministral3 and mistral4 read YaRN's and the query scaling's original context from one
    key: args with two cannot be written."""
    y, s = args.yarn, args.llama_4_scaling
    if y and s and y.original_max_position_embeddings != s.original_max_position_embeddings:
        raise MistralError(
            f"transformers' {kind} has one original_max_position_embeddings for YaRN and the "
            "query scaling; these args have two"
        )


def yarn_keys(y: YarnArgs) -> dict[str, Any]:
    """YaRN's frequencies as every transformers family names them (ministral3's too)."""
    return {
        "factor": y.factor,
        "original_max_position_embeddings": y.original_max_position_embeddings,
        "beta_fast": y.beta,
        "beta_slow": y.alpha,
    }


def rope_parameters(args: ModelArgs, kind: str) -> dict[str, Any]:
    """rope_parameters as transformers' latent types read them: the attention factor written
    out (Mistral's apply_scale), mscale_all_dim for the softmax, mistral4's query scaling."""
    y, s = args.yarn, args.llama_4_scaling
    rope: dict[str, Any] = {"rope_type": "yarn" if y else "default", "rope_theta": args.rope_theta}
    if y:
        rope |= yarn_keys(y) | {"attention_factor": yarn_mscale(y.factor) if y.apply_scale else 1.0}
        if y.mscale_all_dim is not None:
            rope |= {"mscale": y.mscale_all_dim, "mscale_all_dim": y.mscale_all_dim}
    if kind == "mistral4":  # its attention always scales the queries: beta 0 keeps them
        rope["llama_4_scaling_beta"] = s.beta if s else 0.0
        if s:
            rope["original_max_position_embeddings"] = s.original_max_position_embeddings
        rope.setdefault("original_max_position_embeddings", args.max_position_embeddings or 32768)
        rope["partial_rotary_factor"] = args.qk_rope_head_dim / args.head_dim
    return rope


def config_from_args(args: ModelArgs, dtype: str) -> dict[str, Any]:
    """The config.json of the transformers type these args need."""
    kind, m = model_type(args), args.moe
    assert m is not None
    y = args.yarn
    context = int(y.factor * y.original_max_position_embeddings) if y else 32768
    config: dict[str, Any] = {
        "architectures": [CLASSES[kind]],
        "model_type": kind,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "intermediate_size": args.hidden_dim,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "hidden_act": "silu",
        "tie_word_embeddings": args.tied_embeddings,
        "max_position_embeddings": args.max_position_embeddings or context,
        "q_lora_rank": args.q_lora_rank,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        # deepseek types read head_dim as the RoPE part; mistral4 as the whole query head
        "head_dim": args.head_dim if kind == "mistral4" else args.qk_rope_head_dim,
        "n_routed_experts": m.num_experts,
        "num_experts_per_tok": m.num_experts_per_tok,
        "n_shared_experts": m.num_shared_experts or None,
        "moe_intermediate_size": m.expert_hidden_dim or args.hidden_dim,
        "first_k_dense_replace": m.first_k_dense_replace,
        "routed_scaling_factor": m.routed_scale,
        "n_group": m.num_expert_groups,
        "topk_group": m.num_expert_groups_per_tok,
        "norm_topk_prob": m.norm_topk_prob,
        "rope_parameters": rope_parameters(args, kind),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }
    if kind == "deepseek_v2":
        config["topk_method"] = "group_limited_greedy" if m.num_expert_groups > 1 else "greedy"
    else:
        config["rope_interleave"] = True  # the RoPE part stays in pair order
    return config
