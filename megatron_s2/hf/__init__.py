"""Hugging Face interop: a Hugging Face checkpoint folder as the start of a run, and any run as a
Hugging Face model that generates.

- ``config``: a folder's config.json read as our model keys (Megatron's names), every feature we do
  not reproduce refused in one line; and the config.json of an export.
- ``files``: the folder's safetensors (one file or an index of shards), read lazily.
- ``mapping``: one small class per parameter rule (copied, fused QKV per query group, SwiGLU fc1
  as [gate; up]) between Megatron's GPTModel and Hugging Face's Llama names, both directions, and
  this tensor-parallel rank's slice.
- ``load``: a folder's weights into this rank's GPTModel (any tp/pp) after every check.
- ``export``: a run directory (a checkpoint saved at any tp/pp/cp) as a Hugging Face folder.
- ``modeling_s2``: ``attn_implementation="s2"`` for transformers and the exported model class; a
  self-contained file that the export copies into the folder (``trust_remote_code``).
- ``recipe``: the recipe that starts a run from a folder; ``cli``: ``scripts/convert_hf.py``.

The model side never imports this package; it uses the model side (and ``export``/``recipe`` the
trainer's config). Needs the ``hf`` extra (transformers, safetensors).
"""
