"""The pretraining config: recipes compose over the schema, bad configs fail before any work as a
ConfigError naming the key the user sets and its value, and the defaults that follow from the
world size (global batch) or the run length (warmup) are filled in. (The command line's refusals,
one line each: tests/test_cli.py.)"""
import glob
import os

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from megatron_s2.training.config import RECIPES_DIR, Device, Precision, compose_config, validate
from megatron_s2.training.errors import ConfigError
from megatron_s2.training.data import ByteTokenizer, prepare_dataset


# GPU recipes, checked on this CPU machine: everything but the device-specific settings.
CPU_CHECK = ["train.device=cpu", "train.precision=fp32", "parallel.pp=1", "parallel.sequence_parallel=false"]


def _full_message(error: BaseException) -> str:
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__
    return "\n".join(parts)


def test_default_recipe_validates():
    cfg = validate(compose_config(), world_size=1)
    assert cfg.attention.layout == "DSDS"
    assert cfg.train.device == Device.cpu and cfg.train.precision == Precision.fp32
    assert cfg.train.lr_decay_iters == cfg.train.iters
    assert os.path.isabs(cfg.run.dir) and cfg.checkpoint_dir == os.path.join(cfg.run.dir, "checkpoints")


@pytest.mark.parametrize("recipe", sorted(os.path.basename(p)[:-5] for p in glob.glob(f"{RECIPES_DIR}/*.yaml")
                                          if not p.endswith("base.yaml")))
def test_every_recipe_validates(recipe, tmp_path):
    """GPU recipes pass every check that needs no GPU at the world size their tp*cp*pp asks for.
    Recipes that name datasets the user makes first get a small stand-in dataset."""
    composed = compose_config(recipe=recipe)
    p = composed.parallel
    data = []
    if composed.data.prefixes:
        (tmp_path / "doc.txt").write_text("a small stand-in corpus\n" * 200)
        prepare_dataset([str(tmp_path / "doc.txt")], str(tmp_path / "stand_in"), ByteTokenizer())
        data = [f"data.prefixes=[{tmp_path / 'stand_in'}]",
                f"data.valid_prefixes={'[' + str(tmp_path / 'stand_in') + ']' if composed.data.valid_prefixes else '[]'}"]
    cfg = validate(compose_config(CPU_CHECK + data, recipe=recipe), world_size=p.tp * p.cp)
    assert len(cfg.attention.layout) == cfg.model.num_layers


def test_phi3_small_layout():
    cfg = validate(compose_config(CPU_CHECK,
                                  recipe="phi3_small"), world_size=8)
    assert cfg.attention.layout == "SD" * 16
    s2 = cfg.attention.s2
    assert (s2.block_size, s2.local_blocks, s2.vert_stride, s2.head_sliding_offset) == (64, 16, 8, 1)


@pytest.mark.parametrize("override, words", [
    ("model.nmu_layers=3", ["nmu_layers", "ModelConfig"]),            # typo
    ("train.iters=many", ["many", "train.iters"]),                      # wrong type
    ("logging.wandb.mode=sometimes", ["sometimes", "logging.wandb.mode"]),
    ("attention.s2.block_size=1.5", ["1.5", "attention.s2.block_size"]),
    ("data.default_documents=chapter", ["chapter", "data.default_documents"]),
])
def test_schema_rejects_typos_and_types(override, words):
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose_config([override])
    message = _full_message(info.value)
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("overrides, world_size, key, words", [
    (["train.global_batch_size=12", "train.micro_batch_size=8"], 1, "train.global_batch_size=12", ["(8)", "null"]),
    (["train.global_batch_size=8", "train.micro_batch_size=8"], 2, "train.global_batch_size=8", ["dp 2"]),
    (["parallel.tp=2"], 3, "parallel.tp=2", ["world size (3)"]),
    (["attention.layout=DSD"], 1, "attention.layout=DSD", ["model.num_layers is 4"]),
    (["attention.layout=DSXS"], 1, "attention.layout=DSXS", ["'X'"]),
    (["attention.layout=null", "attention.dense_layers=[7]"], 1, "attention.dense_layers=[7]", ["model.num_layers=4"]),
    (["train.seq_length=100"], 1, "train.seq_length=100", ["attention.s2.block_size = 16"]),
    (["parallel.tp=4", "model.num_query_groups=2"], 4, "model.num_query_groups=2", ["parallel.tp (4)"]),
    (["attention.s2.num_dense_heads=3"], 1, "attention.s2.num_dense_heads=3", ["model.num_query_groups (2)"]),
    (["attention.s2.block_size=24"], 1, "attention.s2.block_size=24", ["power of two"]),
    (["attention.s2.block_size=8"], 1, "attention.s2.block_size=8", ["power of two"]),
    (["attention.s2.local_blocks=0"], 1, "attention.s2.local_blocks=0", [">= 1"]),
    (["attention.s2.vert_stride=0"], 1, "attention.s2.vert_stride=0", [">= 1"]),
    (["parallel.cp=2", "train.seq_length=96"], 2, "train.seq_length=96", ["2 * parallel.cp (2)", "64"]),
    (["parallel.tp=8", "model.num_attention_heads=4", "model.num_query_groups=4"], 8,
     "model.num_attention_heads=4", ["parallel.tp (8)"]),
    (["train.max_consecutive_skips=0"], 1, "train.max_consecutive_skips=0", [">= 1"]),
    (["parallel.distributed_timeout_minutes=0"], 1, "parallel.distributed_timeout_minutes=0.0", ["> 0"]),
    (["debug.inject_nan_at_iters=[0]"], 1, "debug.inject_nan_at_iters=[0]", [">= 1"]),
    (["parallel.pp=2"], 2, "parallel.pp=2", ["cuda"]),
    (["train.precision=bf16", "train.device=cpu"], 1, "train.precision=bf16", ["fp32"]),
    (["data.prefixes=[/nonexistent/corpus]"], 1, "data.prefixes[0]=/nonexistent/corpus", ["corpus.bin does not exist"]),
    (["data.tokenizer=/nonexistent/tokenizer"], 1, "data.tokenizer=/nonexistent/tokenizer", ["'byte'"]),
    (["train.lr=1e-5", "train.min_lr=1e-4"], 1, "train.lr=1e-05", ["train.min_lr (0.0001)"]),
    (["data.loss_token_ids=[65,257]"], 1, "data.loss_token_ids=[65,257]", ["[0, 257)"]),
    (["data.loss_token_ids=[]"], 1, "data.loss_token_ids=[]", ["non-empty"]),
    (["data.reset_attention_mask=true"], 1, "data.reset_attention_mask=true", ["needs data.reset_position_ids=true"]),
    (["data.reset_position_ids=true"], 1, "data.reset_position_ids=true", ["needs data.reset_attention_mask=true"]),
    (["parallel.cp=2", "data.reset_attention_mask=true", "data.reset_position_ids=true"], 1,
     "data.reset_attention_mask=true", ["packed documents are not supported with parallel.cp > 1"]),
])
def test_validate_names_key_and_value(overrides, world_size, key, words):
    """A refusal is a ConfigError on the key the user sets (not the model side's argument name)."""
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides), world_size=world_size)
    message = str(info.value)
    assert message.startswith(key + ": "), message
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


def test_global_batch_follows_micro_batch_and_dp():
    """Unset (null) global batch = micro_batch_size x dp, Megatron's default; the tiny recipe
    leaves it unset, so it runs unchanged on 1, 2 or 4 processes."""
    for world_size, parallel, dp in ((1, [], 1), (2, [], 2), (4, [], 4), (2, ["parallel.tp=2"], 1),
                                     (4, ["parallel.cp=2"], 2)):
        cfg = validate(compose_config(parallel), world_size=world_size)
        assert cfg.train.global_batch_size == cfg.train.micro_batch_size * dp, (world_size, parallel)
    assert validate(compose_config(["train.global_batch_size=32"]), world_size=2).train.global_batch_size == 32


def test_short_run_clamps_warmup_with_a_note():
    notes = []
    cfg = validate(compose_config(["train.iters=20"]), world_size=1, note=notes.append)
    assert (cfg.train.warmup_iters, cfg.train.lr_decay_iters) == (2, 20)
    assert len(notes) == 1 and notes[0].startswith("train.warmup_iters=20 does not fit"), notes
    cfg = validate(compose_config(["train.iters=200"]), world_size=1, note=notes.append)
    assert cfg.train.warmup_iters == 20 and len(notes) == 1


def test_packing_validates_on_tp_and_dp():
    """Packed documents (both keys on) pass with tensor and data parallelism; only cp is refused."""
    packing = ["data.reset_attention_mask=true", "data.reset_position_ids=true"]
    for world_size, parallel in ((1, []), (2, ["parallel.tp=2"]), (2, [])):
        cfg = validate(compose_config(packing + parallel), world_size=world_size)
        assert cfg.data.reset_attention_mask and cfg.data.reset_position_ids
