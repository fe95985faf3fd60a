"""The recipe that starts a run from a Hugging Face checkpoint folder.

``write_recipe(hf_dir, layout, out)`` composes a base recipe (``tiny`` unless told) with the model
keys of the folder's config.json, ``attention.layout``, ``checkpoint.init_from`` and
``data.tokenizer`` set to the folder, and then the caller's overrides (Hydra's syntax); checks it
as ``scripts/pretrain.py`` would on this machine (``validate``, then the init_from checks); and
writes it, every key explicit, as a self-contained recipe (its defaults list names only the
schema) for ``scripts/pretrain.py --config-path DIR --config-name NAME``. Nothing is written when a
check fails (ConfigError naming the key).
"""
from __future__ import annotations

import os

from omegaconf import OmegaConf

from megatron_s2.training.config import compose_config, validate
from megatron_s2.training.errors import ConfigError, show_value
from megatron_s2.training.init_from import check_init_from

from .config import CheckpointError
from .load import check_checkpoint

HEADER = """# Starts from the Hugging Face checkpoint {hf_dir} with layout {layout}; written by
# scripts/convert_hf.py recipe (base recipe {base}). Run it with
#   python scripts/pretrain.py --config-path {config_path} --config-name {name}
defaults:
  - pretrain_schema
  - _self_
"""


def write_recipe(hf_dir: str, layout: str, out: str, base: str = "tiny", overrides: list[str] = ()) -> str:
    """Write the recipe ``out`` (DIR/NAME.yaml); returns its path. ConfigError on any refusal."""
    hf_dir, out = os.path.abspath(hf_dir), os.path.abspath(out)
    name, ext = os.path.splitext(os.path.basename(out))
    if ext != ".yaml":
        raise ConfigError("--out", out, "must name a .yaml file (DIR/NAME.yaml)")
    try:
        keys, _, _ = check_checkpoint(hf_dir)
    except CheckpointError as e:
        raise ConfigError("HF_DIR", hf_dir, str(e)) from e
    settings = [f"model.{key}={show_value(value)}" for key, value in keys.model_keys().items()]
    settings += [f"attention.layout={layout}", f"checkpoint.init_from={hf_dir}", f"data.tokenizer={hf_dir}",
                 f"run.name={name}"]
    composed = compose_config(settings + list(overrides), recipe=base)
    p = composed.parallel
    cfg = validate(composed.copy(), world_size=p.tp * p.cp * p.pp)
    check_init_from(cfg)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    config_path = os.path.relpath(os.path.dirname(out))
    header = HEADER.format(hf_dir=hf_dir, layout=cfg.attention.layout, base=base, name=name,
                           config_path=os.path.dirname(out) if config_path.startswith("..") else config_path)
    with open(out, "w") as f:
        f.write(header + OmegaConf.to_yaml(composed))
    return out
