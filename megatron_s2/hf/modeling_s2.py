"""S2-Attention in Hugging Face transformers: ``attn_implementation="s2"`` and the model class of an
exported hybrid (megatron-s2, https://arxiv.org/abs/2407.17678).

Self-contained (torch, transformers; the ``s2attn`` kernels when they are installed), so that
``scripts/convert_hf.py export`` copies it into the exported folder, with s2attn's ``layout.py`` as
``s2_layout.py``, and ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``
loads the model without megatron_s2 (as lm-evaluation-harness does). Importing it registers:

- ``"s2"`` in transformers' ``AttentionInterface`` (``s2_attention_forward``) and, in
  ``AttentionMaskInterface``, sdpa's boolean mask (without a mask function transformers would build
  none and padding would be ignored). Layer ``module.layer_idx`` is dense or S2-sparse by
  ``config.s2["layout"]``; dense layers run transformers' sdpa attention unchanged.
- ``S2LlamaConfig`` (model_type ``s2_llama``): a Llama config with an ``s2`` section (``layout``
  and the S2 pattern's keys, ``PATTERN_KEYS``) and ``qkv_bias`` (biases on q/k/v only, Qwen2's).
- ``S2LlamaForCausalLM``: Llama with ``attn_implementation="s2"`` (the only one it accepts).

An S layer computes, per batch row, S2 attention (s2attn.S2Layout's pattern) over the tokens the
mask lets in, with S2 blocks counted from the row's first real token (as Phi-3-small counts from
its left paddings), so a left-padded row attends exactly as it would alone. Supported masks: no
mask, or causal with padding (one run of real tokens per row, left or right). The queries must
be the newest keys (no cache, or a DynamicCache: ``generate``'s default); anything else (a custom
4D mask, packed sequences, a StaticCache) is refused with a ValueError. Query rows that are
padding get zeros.

How an S layer runs: with ``s2attn`` installed, every S layer calls ``s2attn.s2_attention``
(Triton on CUDA, the block-sparse torch path on CPU; O(kv) memory, whatever the length); without
it, dense attention under the S2 token mask, the same result at O(q * kv) memory (a warning says
so once).
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

try:
    from s2attn import S2Layout, s2_attention
except ImportError:     # the exported folder without the kernels: its copy of s2attn/layout.py
    from .s2_layout import S2Layout
    s2_attention = None

NAME = "s2"
PATTERN_KEYS = ("block_size", "local_blocks", "vert_stride", "head_sliding_offset", "head_sliding_step",
                "num_dense_heads", "homo_head", "head_sharding")
"""The S2Layout fields an ``s2`` config section holds besides ``layout`` (heads come from the layer)."""


@functools.lru_cache(maxsize=None)
def _layout(num_heads: int, num_kv_heads: int, pattern: tuple) -> S2Layout:
    with warnings.catch_warnings():     # coverage of the context was judged when the model was trained
        warnings.filterwarnings("ignore", message="S2 heads do not cover")
        return S2Layout(num_heads=num_heads, num_kv_heads=num_kv_heads, **dict(pattern))


def real_token_runs(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int) -> list[tuple[int, int]]:
    """[(start, end)] per batch row: the keys the mask lets in, one run. ``attention_mask``: None or
    bool [batch, 1, q_len, >= kv_len] (True: attend), with the queries at the last q_len keys.
    ValueError unless the mask is exactly causal over those runs, and unless some row's run ends at
    the last key when q_len < kv_len (keys beyond the queries: a StaticCache)."""
    if attention_mask is None:
        return [(0, kv_len)] * batch
    if attention_mask.dtype != torch.bool or attention_mask.shape[1] != 1:
        raise ValueError(f"S2 layers take sdpa's boolean mask [batch, 1, q, kv], got {attention_mask.dtype} "
                         f"{tuple(attention_mask.shape)}")
    allowed = attention_mask[:, 0, :, :kv_len]
    real = allowed.any(dim=1)                                                  # [batch, kv]
    position = torch.arange(kv_len, device=allowed.device)
    start = torch.where(real, position, kv_len).amin(dim=1)
    end = torch.where(real, position + 1, 0).amax(dim=1)
    inside = (position >= start[:, None]) & (position < end[:, None])
    causal = position[None, :] <= (kv_len - q_len + torch.arange(q_len, device=allowed.device))[:, None]
    if not torch.equal(allowed, causal[None] & inside[:, None, :]):
        raise ValueError("S2 layers take causal attention with padding only (one run of real tokens per row); "
                         "got another mask (packed sequences, a custom 4D mask or a sliding window?)")
    if q_len < kv_len and not bool((end == kv_len).any()):
        raise ValueError("S2 layers need the queries to be the newest keys (no cache or a DynamicCache); "
                         "the keys go on past every row's last token (a StaticCache?)")
    return [(s, e) if s < e else (0, 0) for s, e in zip(start.tolist(), end.tolist())]


def _masked_s2(q, k, v, layout: S2Layout, scale: float, q_offset: int) -> torch.Tensor:
    """Dense attention under the S2 token mask ([b, s, h, d] in and out; K/V of each kv head
    repeated to its query heads); queries at q_offset, keys at 0."""
    bs = layout.block_size
    q_pos = torch.arange(q.shape[1], device=q.device) + q_offset
    k_pos = torch.arange(k.shape[1], device=q.device)
    blocks = layout.block_mask(int(q_pos[-1]) // bs + 1, (k.shape[1] - 1) // bs + 1, device=q.device)
    allowed = blocks[:, q_pos // bs][:, :, k_pos // bs] & (k_pos[None, :] <= q_pos[:, None])
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2).transpose(1, 2) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=allowed, scale=scale)
    return out.transpose(1, 2)


def _attend(q, k, v, layout: S2Layout, scale: float, q_offset: int) -> torch.Tensor:
    if s2_attention is not None:
        return s2_attention(q, k, v, layout, softmax_scale=scale, q_offset=q_offset)
    _warn_dense_fallback()
    return _masked_s2(q, k, v, layout, scale, q_offset)


@functools.lru_cache(maxsize=1)
def _warn_dense_fallback() -> None:
    warnings.warn("s2attn is not installed: S2 layers run dense attention under the S2 mask (the same "
                  "result, O(q*kv) memory); `pip install megatron-s2` for the block-sparse kernels")


def _s2_layer(module, query, key, value, attention_mask, scaling: float) -> torch.Tensor:
    """out [b, q, heads, d] of an S layer; query [b, heads, q, d], key/value [b, kv_heads, kv, d]."""
    b, heads, q_len, d = query.shape
    kv_len = key.shape[2]
    s2 = module.config.s2
    layout = _layout(heads, key.shape[1], tuple((name, s2[name]) for name in PATTERN_KEYS if name in s2))
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))               # [b, s, h, d]
    out = q.new_zeros(q.shape)
    first_query = kv_len - q_len                     # the cache index of query 0
    rows_of = {}
    for row, run in enumerate(real_token_runs(attention_mask, b, q_len, kv_len)):
        rows_of.setdefault(run, []).append(row)
    for (start, end), rows in rows_of.items():
        i0, i1 = max(start - first_query, 0), min(end - first_query, q_len)  # the row's real queries
        if i0 >= i1:
            continue
        position = first_query + i0 - start          # of query i0, counted from the row's first token
        lead = position % layout.block_size          # s2_attention wants a block-aligned q_offset
        rows = torch.tensor(rows, device=q.device)
        q_rows = q[rows, i0:i1]
        if lead:
            q_rows = torch.cat((q_rows.new_zeros(len(rows), lead, heads, d), q_rows), dim=1)
        attended = _attend(q_rows, k[rows, start:end], v[rows, start:end], layout, scaling, position - lead)
        out[rows, i0:i1] = attended[:, lead:]
    return out


def s2_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function contract: query [b, heads, q, d], key/value [b, kv_heads,
    kv, d] (after RoPE, K/V not repeated), attention_mask from sdpa_mask; returns (out [b, q, heads,
    d], None). Dense layers go to transformers' sdpa attention; S layers see the module docstring."""
    if module.config.s2["layout"][module.layer_idx] == "D":
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    if dropout:
        raise ValueError(f"S2 layers take no attention dropout, got {dropout}")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return _s2_layer(module, query, key, value, attention_mask, scale), None


AttentionInterface.register(NAME, s2_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


class S2LlamaConfig(LlamaConfig):
    """A Llama config with ``s2`` ({"layout": "DSDS", <PATTERN_KEYS>}) and ``qkv_bias``."""

    model_type = "s2_llama"


class S2LlamaForCausalLM(LlamaForCausalLM):
    """Llama whose layers attend as ``config.s2["layout"]`` says (``attn_implementation="s2"``), with
    biases on q/k/v when ``config.qkv_bias``."""

    config_class = S2LlamaConfig

    def __init__(self, config: S2LlamaConfig) -> None:
        if config._attn_implementation not in (None, NAME):
            raise ValueError(f"{type(self).__name__} runs attn_implementation={NAME!r} (its S layers are "
                             f"sparse), got {config._attn_implementation!r}")
        config._attn_implementation = NAME
        super().__init__(config)
        if getattr(config, "qkv_bias", False):
            for layer in self.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias = torch.nn.Parameter(proj.weight.new_zeros(proj.out_features))
