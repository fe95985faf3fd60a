"""Subprocess: an exported hybrid loaded as lm-evaluation-harness loads it, with megatron_s2 made
unimportable, checked against our model and against itself.

    python hf_remote_code_check.py EXPORT_DIR EXPECTED.pt OUT.json

EXPECTED.pt holds {"tokens": [b, s], "logits": our model's fp32 logits}. Writes to OUT.json:
- ``logits_error``: the largest difference relative to the largest of ours, of
  ``AutoModelForCausalLM.from_pretrained(EXPORT_DIR, trust_remote_code=True)``'s logits;
- ``batch1``, ``padded``: greedy tokens of ``generate`` with the KV cache and with full
  recomputation (``use_cache=False``), for one prompt and for a left-padded batch of two prompts
  of different lengths, and each padded row's tokens generated alone;
- ``long``: prompt length, the key lengths s2attn's kernel saw in the S layers (the torch backend's
  entry point, counted by a wrapper) while generating 3 tokens from a long prompt, and its tokens
  with and without the cache;
- ``fallback_error``: the same long prompt's logits with s2attn switched off in the loaded module
  (dense attention under the S2 mask) against those through s2attn, and whether it warned.
"""
import json
import sys
import warnings

sys.modules["megatron_s2"] = None          # the exported folder must not need our package

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import s2attn.torch_attention  # noqa: E402

PAD = 256


def greedy(model, ids, mask, new_tokens, use_cache):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         use_cache=use_cache, pad_token_id=PAD, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


def left_padded(rows):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def main(export_dir, expected_path, out_path):
    expected = torch.load(expected_path)
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).eval()
    module = sys.modules[type(model).__module__]
    results = {"class": type(model).__name__, "attn_implementation": model.config._attn_implementation}
    with torch.no_grad():
        logits = model(expected["tokens"]).logits
    results["logits_error"] = ((logits - expected["logits"]).abs().max() / expected["logits"].abs().max()).item()

    generator = torch.Generator().manual_seed(7)
    prompt = lambda n: torch.randint(0, 256, (n,), generator=generator).tolist()   # noqa: E731
    one = prompt(53)
    ids, mask = left_padded([one])
    results["batch1"] = {"cache": greedy(model, ids, mask, 24, True), "recompute": greedy(model, ids, mask, 24, False)}
    rows = [prompt(70), prompt(37)]
    ids, mask = left_padded(rows)
    alone = [greedy(model, *left_padded([r]), 24, True)[0] for r in rows]
    results["padded"] = {"cache": greedy(model, ids, mask, 24, True), "recompute": greedy(model, ids, mask, 24, False),
                         "alone": alone}

    seen, kernel = [], s2attn.torch_attention.torch_attention

    def counting(q, k, *args):
        seen.append(k.shape[1])
        return kernel(q, k, *args)

    long = prompt(330)
    ids, mask = left_padded([long])
    s2attn.torch_attention.torch_attention = counting
    cached = greedy(model, ids, mask, 3, True)
    s2attn.torch_attention.torch_attention = kernel
    results["long"] = {"prompt": len(long), "kernel_key_lengths": seen, "cache": cached,
                       "recompute": greedy(model, ids, mask, 3, False)}

    with torch.no_grad():
        through_s2attn = model(ids).logits
        module.s2_attention = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dense_masked = model(ids).logits
    results["fallback_error"] = ((dense_masked - through_s2attn).abs().max() / through_s2attn.abs().max()).item()
    results["fallback_warned"] = any("s2attn is not installed" in str(w.message) for w in caught)
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
