"""Map Llama 3 state dicts between titan's (Meta's) names and Hugging Face transformers' names.

Meta rotates interleaved (even, odd) pairs of each head; transformers rotates the two halves of
each head ("rotate_half"). The two agree once wq/wk rows are permuted, done here both ways.
"""

import re

import torch

from titan.models.llama3.args import ModelArgs

# titan name (with {} for the layer index) -> transformers name
_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# titan linear -> the transformers module it is (PEFT's target_modules name them so)
HF_LINEARS = {
    "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
    "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj", "output": "lm_head",
}  # fmt: skip
# titan's adapter parameters -> PEFT's names (after the module's name)
_PEFT_PARAMS = {
    "lora_a": "lora_A.weight",
    "lora_b": "lora_B.weight",
    "lora_magnitude": "lora_magnitude_vector",
}
_TO_HF = {re.compile(re.escape(k).replace(r"\{\}", r"(\d+)") + "$"): v for k, v in _NAMES.items()}
_FROM_HF = {re.compile(re.escape(v).replace(r"\{\}", r"(\d+)") + "$"): k for k, v in _NAMES.items()}


def _meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved pairs to halves: (n_heads * hd, dim)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _rename(name: str, table: dict[re.Pattern, str]) -> str:
    for pattern, target in table.items():
        m = pattern.match(name)
        if m:
            return target.format(*m.groups())
    raise KeyError(f"no Llama 3 mapping for parameter {name!r}")


def to_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """titan state dict -> transformers LlamaForCausalLM state dict."""
    out = {}
    for name, w in state_dict.items():
        if args.tie_word_embeddings and name == "output.weight":
            continue  # transformers ties lm_head to embed_tokens itself
        if name.endswith("attention.wq.weight"):
            w = _meta_to_hf_rows(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = _meta_to_hf_rows(w, args.n_kv_heads)
        out[_rename(name, _TO_HF)] = w
    return out


def from_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """transformers LlamaForCausalLM state dict -> titan state dict."""
    out = {}
    for name, w in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer transformers derives from the config, as titan does
        if name.endswith("self_attn.q_proj.weight"):
            w = _hf_to_meta_rows(w, args.n_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = _hf_to_meta_rows(w, args.n_kv_heads)
        out[_rename(name, _FROM_HF)] = w
    if args.tie_word_embeddings:
        out.setdefault("output.weight", out["tok_embeddings.weight"])
    return out


def hf_name(name: str, args: ModelArgs) -> str:
    """The transformers tensor that titan's `name` is read from (a tied output: the embedding)."""
    if args.tie_word_embeddings and name == "output.weight":
        name = "tok_embeddings.weight"
    return _rename(name, _TO_HF)


def hf_rows(name: str, n_rows: int, args: ModelArgs) -> torch.Tensor | None:
    """For wq and wk, the transformers row each of titan's rows comes from (from_hf's
    permutation); None for the other tensors, whose rows are the same."""
    heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.n_kv_heads}
    n = next((h for suffix, h in heads.items() if name.endswith(suffix)), None)
    if n is None:
        return None
    return _hf_to_meta_rows(torch.arange(n_rows).unsqueeze(1), n).squeeze(1)


def lora_to_peft(adapters: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """titan adapter tensors (`layers.0.attention.wq.lora_b`) -> the state dict of a PEFT
    adapter_model.safetensors (`base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight`).

    transformers holds wq/wk with permuted rows P W; P (W + s B A) = P W + s (P B) A, so B and
    DoRA's per-row magnitude are permuted like the rows, A is not."""
    out = {}
    for key, t in adapters.items():
        module, param = key.rsplit(".", 1)
        heads = {"wq": args.n_heads, "wk": args.n_kv_heads}.get(module.rsplit(".", 1)[-1])
        if heads is not None and param != "lora_a":
            t = _meta_to_hf_rows(t.reshape(t.shape[0], -1), heads).reshape(t.shape)
        hf_module = _rename(f"{module}.weight", _TO_HF).removesuffix(".weight")
        out[f"base_model.model.{hf_module}.{_PEFT_PARAMS[param]}"] = t
    return out


def hf_config_dict(args: ModelArgs) -> dict:
    """A transformers LlamaConfig (config.json) dict describing the same architecture."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    if args.rope_scaling is not None:
        s = args.rope_scaling
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return cfg
