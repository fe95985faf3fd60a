"""Import: a Hugging Face checkpoint folder as the start of a run (checkpoint.init_from).

Against the Hugging Face model itself (tiny random models built here, tests/hf_models.py): with
layout all-D our model's fp32 logits equal Hugging Face's (max relative error 1e-5) for GQA 4:2,
untied and tied embeddings, rope base 500000 with Llama-3 scaling, Qwen2's q/k/v biases and
Mistral, at tp=1 and tp=2; Hugging Face -> ours -> Hugging Face gives the same tensors bit for bit.
Refusals name the file and the key: every config.json feature we do not reproduce, missing or
misshapen safetensors, a recipe key that differs from config.json.
"""
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from hf_models import CASES, VOCAB, max_relative_error, our_logits, recipe_config, save_hf_model  # noqa: E402
from torchrun import run_workers  # noqa: E402

from megatron_s2.hf.config import CheckpointError, read_hf_config  # noqa: E402
from megatron_s2.hf.export import hf_state_dict  # noqa: E402
from megatron_s2.hf.load import check_checkpoint  # noqa: E402
from megatron_s2.parallel import model_parallel_session  # noqa: E402
from megatron_s2.training.errors import ConfigError  # noqa: E402

WORKER = Path(__file__).parent / "multiproc" / "hf_import_worker.py"
TOKENS = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, save_hf_model(root / name, arch, **keywords))
            for name, (arch, keywords) in CASES.items()}


@pytest.mark.parametrize("name", CASES)
def test_all_dense_logits_equal_hugging_faces(folders, name, tmp_path):
    folder, hf = folders[name]
    cfg = recipe_config(folder, "DD", tmp_path)
    with model_parallel_session(1):
        ours = our_logits(cfg, TOKENS)
    with torch.no_grad():
        theirs = hf(TOKENS).logits
    assert ours.shape == theirs.shape == (2, 64, VOCAB)
    assert max_relative_error(ours, theirs) <= 1e-5


@pytest.mark.slow
def test_all_dense_logits_equal_hugging_faces_at_tp2(folders, tmp_path):
    for name in CASES:
        recipe_config(folders[name][0], "DD", tmp_path, "parallel.tp=2", world_size=2)
    errors = run_workers(WORKER, 2, tmp_path / "errors.json", str(tmp_path), *(str(folders[n][0]) for n in CASES))
    assert sorted(errors) == sorted(CASES)
    assert all(error <= 1e-5 for error in errors.values()), errors


@pytest.mark.parametrize("name", CASES)
def test_hugging_face_to_ours_to_hugging_face_is_identical(folders, name, tmp_path):
    from safetensors.torch import load_file

    folder, _ = folders[name]
    cfg = recipe_config(folder, "DD", tmp_path)
    with model_parallel_session(1):
        from megatron_s2.training.init_from import load_init_from
        from megatron_s2.training.loop import build_model, transformer_config
        model = build_model(cfg, transformer_config(cfg), cfg.model.vocab_size)
        load_init_from(model, cfg)
        keys, _, _ = check_checkpoint(str(folder))
        back = hf_state_dict(model.state_dict(), keys)
    source = load_file(folder / "model.safetensors")
    assert sorted(back) == sorted(source)
    assert all(torch.equal(back[k], source[k]) for k in source), [k for k in source if not torch.equal(back[k], source[k])]


# -- refusals ------------------------------------------------------------------------------------

def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture
def llama(tmp_path):
    folder = tmp_path / "llama"
    save_hf_model(folder, "llama", layers=1)
    return folder


@pytest.mark.parametrize("changes, named", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures=['GPT2LMHeadModel'] is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_parameters": {**CASES["llama3_rope"][1]["rope_parameters"], "original_max_position_embeddings": 4096}},
     "original_max_position_embeddings=4096"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "use_sliding_window=true"),
])
def test_config_we_do_not_reproduce_is_refused_naming_file_and_key(llama, changes, named):
    _edit_config(llama, **changes)
    with pytest.raises(CheckpointError) as refusal:
        read_hf_config(str(llama))
    assert str(refusal.value).startswith(f"{llama / 'config.json'}: ") and named in str(refusal.value)


def test_transformers4_rope_keys_read_like_rope_parameters(llama):
    _edit_config(llama, rope_parameters=None, rope_theta=500000.0,
                 rope_scaling={k: v for k, v in CASES["llama3_rope"][1]["rope_parameters"].items() if k != "rope_theta"})
    keys, _ = read_hf_config(str(llama))
    assert (keys.rotary_base, keys.rope_scaling, keys.rope_scaling_factor) == (500000, True, 8.0)


def test_missing_or_misshapen_safetensors_are_named(llama):
    from safetensors.torch import load_file, save_file

    weights = load_file(llama / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][:64]
    save_file(weights, llama / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: model\.layers\.0\.mlp\.up_proj\.weight has "
                                              r"shape \[64, 64\], config.json implies \[96, 64\]"):
        check_checkpoint(str(llama))
    del weights["model.norm.weight"]
    save_file(weights, llama / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: no tensor model\.norm\.weight"):
        check_checkpoint(str(llama))
    (llama / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"model-00002\.safetensors: missing \(model\.safetensors\.index\.json"):
        check_checkpoint(str(llama))
    os.remove(llama / "model.safetensors.index.json")
    os.remove(llama / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing, and no model\.safetensors\.index\.json"):
        check_checkpoint(str(llama))


def test_recipe_keys_that_differ_from_config_json_are_refused(llama, tmp_path):
    from megatron_s2.training.init_from import check_init_from

    cfg = recipe_config(llama, "D", tmp_path)
    cfg.model.layernorm_epsilon = 1e-6
    with pytest.raises(ConfigError) as refusal:
        check_init_from(cfg)
    assert str(refusal.value).startswith("model.layernorm_epsilon=1e-06: ") and "gives 1e-05 (rms_norm_eps" in str(refusal.value)

    mistral = tmp_path / "mistral"
    save_hf_model(mistral, "mistral", layers=1, sliding_window=32)
    with pytest.raises(ConfigError, match=r"^train.seq_length=64: .*sliding_window=32"):
        recipe_config(mistral, "D", tmp_path)


def test_checkpoints_saved_before_the_new_model_keys_still_resume():
    """run.json of a checkpoint saved before vocab_size, add_qkv_bias, layernorm_epsilon and rope_scaling
    existed: the keys take their defaults, so the same model resumes and another one is refused."""
    from megatron_s2.training.checkpoint import check_compatible
    from megatron_s2.training.config import ModelConfig, to_plain_dict

    new_keys = ("add_qkv_bias", "layernorm_epsilon", "rope_scaling", "rope_scaling_factor")
    current = {"layout": "DS", "s2": {"block_size": 16}, "model": to_plain_dict(ModelConfig())}
    old = {**current, "model": {k: v for k, v in current["model"].items() if k not in new_keys}}
    defaults = {"model": to_plain_dict(ModelConfig())}
    check_compatible(old, current, "ckpt", defaults=defaults)
    with pytest.raises(ConfigError, match=r"^model.add_qkv_bias=true: ckpt was saved with model.add_qkv_bias=false"):
        check_compatible(old, {**current, "model": {**current["model"], "add_qkv_bias": True}}, "ckpt", defaults=defaults)


def test_the_folders_tokenizer_is_the_data_tokenizer_unless_the_recipe_says_otherwise(llama, tmp_path):
    from megatron_s2.training.config import compose_config, validate

    def tokenizer(*overrides):
        return validate(compose_config([f"run.dir={tmp_path}/run", *overrides]), world_size=1).data.tokenizer

    assert tokenizer() == "byte"
    assert tokenizer(f"checkpoint.init_from={llama}") == str(llama)
    assert tokenizer(f"checkpoint.init_from={llama}", "data.tokenizer=byte") == "byte"
