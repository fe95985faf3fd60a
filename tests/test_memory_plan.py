"""The memory and speed plan (megatron_s2.memory, megatron_s2.training.plan, --plan).

Oracles: the parameter count of the model itself, built on the meta device at tp 1 and 2 (a fake
process group gives one process Megatron's tp=2 shapes); the bytes each layer saves for backward,
counted on CPU with saved_tensors_hooks, for the tiny recipe's shape and a wider one, D and S
layers, with and without recomputation (within 10%); on a GPU (marked) the same count on CUDA in
bf16. The command line prints a plan for the shipped GPU recipes without a GPU, refuses nothing
for not fitting, names a change that does fit; the trainer refuses, in one line and before
building anything, a model that cannot fit its device.
"""
import contextlib

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_s2 import build_gpt_model
from megatron_s2.memory import Shape, layer_activations, outside_layers, parameters_per_rank
from megatron_s2.parallel import model_parallel_session
from megatron_s2.saved_tensors import measure_forward
from megatron_s2.training import cli
from megatron_s2.training.config import compose_config, validate
from megatron_s2.training.loop import padded_vocab_size, transformer_config
from megatron_s2.training.plan import make_plan

CPU = ["train.device=cpu", "train.precision=fp32", "parallel.sequence_parallel=false"]


@contextlib.contextmanager
def fake_world(tp: int):
    """Megatron's model-parallel state of rank 0 in a world of ``tp`` ranks, in this one process
    (torch's fake backend: collectives do nothing), for building models on the meta device."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    parallel_state.initialize_model_parallel(tp, create_gloo_process_groups=False)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("recipe, tied", [("llama_7b_128k", False), ("phi3_small", True)])
def test_parameters_equal_the_built_model(recipe, tied, tp):
    """Per rank, exactly: the model built on the meta device (the recipe's shapes, a vocabulary
    padded for tp) has the parameters the plan counts, and so do a first and a last pipeline
    stage alone."""
    overrides = [f"parallel.tp={tp}", "parallel.cp=1", f"parallel.sequence_parallel={tp > 1}",
                 f"model.share_embeddings_and_output_weights={tied}", "train.device=cuda"]
    cfg = validate(compose_config(overrides, recipe=recipe), world_size=tp, check_environment=False)
    config = transformer_config(cfg)
    config.use_cpu_initialization, config.perform_initialization = True, False
    config.num_layers = 2                                    # the count is per layer: two suffice
    vocab = padded_vocab_size(50257, cfg)
    with fake_world(tp), torch.device("meta"):
        for first, last in ((True, True), (True, False), (False, True)):
            model = build_gpt_model(config, cfg.attention.s2, cfg.attention.layout[:2], vocab_size=vocab,
                                    max_sequence_length=cfg.train.seq_length, pre_process=first, post_process=last,
                                    share_embeddings_and_output_weights=tied)
            built = sum(p.numel() for p in model.parameters())
            assert built == parameters_per_rank(config, vocab, pre_process=first, post_process=last,
                                                share_embeddings_and_output_weights=tied), (first, last)


SHAPES = {"tiny": [],
          "wider": ["model.hidden_size=256", "model.num_attention_heads=8", "model.num_query_groups=4",
                    "model.ffn_hidden_size=704", "train.seq_length=512", "train.micro_batch_size=2",
                    "attention.s2.block_size=32"]}
SETTINGS = {"none": [], "core_attn": ["model.recompute_granularity=selective"],
            "full": ["model.recompute_granularity=full", "model.recompute_method=block",
                     "model.recompute_num_layers=2"]}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_activations_within_10_percent_of_saved_bytes(shape, setting):
    """Each layer (D and S) and what lies outside the layers, against saved_tensors_hooks' count
    of one training forward (fp32, CPU, hidden dropout on)."""
    cfg = validate(compose_config(SHAPES[shape] + SETTINGS[setting] + CPU + [
        "model.num_layers=2", "attention.layout=DS", "model.hidden_dropout=0.1"]), world_size=1)
    config, t = transformer_config(cfg), cfg.train
    vocab = padded_vocab_size(257, cfg)
    with model_parallel_session(1):
        saved = measure_forward(config, cfg.attention.s2, "DS", seq_length=t.seq_length,
                                micro_batch_size=t.micro_batch_size, vocab_size=vocab)
    shape = Shape(t.seq_length, t.micro_batch_size, device="cpu")
    for kind, measured in zip("DS", saved.layers):
        planned = sum(layer_activations(config, kind, shape, setting).values())
        assert planned == pytest.approx(measured, rel=0.1), (kind, planned, measured, saved.shapes)
    assert sum(outside_layers(config, vocab, shape).values()) == pytest.approx(saved.other, rel=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("micro_batch_size", [1, 2])
@pytest.mark.parametrize("setting", ["none", "core_attn"])
def test_activations_within_10_percent_on_cuda(micro_batch_size, setting):
    """The CUDA figures (bf16, Triton S2, flash SDPA, torch's fused rms_norm) against the count."""
    cfg = validate(compose_config(SHAPES["wider"] + SETTINGS[setting] + [
        "model.num_layers=2", "attention.layout=DS", "train.device=cuda", "train.precision=bf16",
        f"train.micro_batch_size={micro_batch_size}"]), world_size=1)
    with model_parallel_session(1):
        config, t = transformer_config(cfg), cfg.train
        saved = measure_forward(config, cfg.attention.s2, "DS", seq_length=t.seq_length,
                                micro_batch_size=t.micro_batch_size, vocab_size=384, recompute_impl="megatron")
    shape = Shape(t.seq_length, t.micro_batch_size, device="cuda")
    for kind, measured in zip("DS", saved.layers):
        assert sum(layer_activations(config, kind, shape, setting).values()) == pytest.approx(measured, rel=0.1), \
            (kind, saved.shapes)


# -- the plan and the command line -----------------------------------------------------------------
@pytest.mark.parametrize("recipe, world, vocab", [("llama_1p3b_32k", 8, 128256), ("llama_7b_128k", 64, 128256),
                                                  ("phi3_small", 4, 100352)])
def test_plan_of_the_gpu_recipes_without_a_gpu(recipe, world, vocab, capsys):
    """Exit 0, no process group, and the shipped recipe fits an 80 GiB GPU with a tenth to spare
    for what the plan does not count (its README row quotes this peak)."""
    code = cli.main([f"--config-name={recipe}", "--plan", "--world-size", str(world), "--gpu-memory", "80",
                     "--vocab-size", str(vocab)])
    out = capsys.readouterr().out
    assert code == 0 and not dist.is_initialized()
    assert ": fits (" in out, out
    plan, _ = make_plan(compose_config(recipe=recipe), world, 80, vocab)
    assert plan.worst.peak <= 0.9 * 80 * 2**30


def test_plan_says_does_not_fit_and_what_would(capsys):
    code = cli.main(["--config-name=llama_7b_128k", "--plan", "--world-size=64", "--gpu-memory=20",
                     "--vocab-size=128256"])
    out = capsys.readouterr().out
    assert code == 0 and "does not fit; it fits with model.recompute_granularity=" in out, out
    composed = compose_config(recipe="llama_7b_128k")
    plan, (overrides, other) = make_plan(composed, 64, 20, 128256)
    assert not plan.fits and other.fits
    again, _ = make_plan(compose_config(overrides, recipe="llama_7b_128k"), 64, 20, 128256)
    assert again.worst.peak == other.worst.peak <= 20 * 2**30


def test_plan_static_memory_of_the_engines():
    """Bytes per parameter: the cuda path 2 (bf16) + 4 (fp32 gradient buffer) + 12 / (dp x cp)
    (fp32 main copy and Adam's moments, distributed); the cpu path 4 + 4 + 8."""
    gpu, _ = make_plan(compose_config(recipe="llama_1p3b_32k"), 16, 80, 32000)            # dp 2, cp 4
    s = gpu.worst
    assert (s.param_bytes, s.grad_bytes, s.optimizer_bytes) == (2 * s.parameters, 4 * s.parameters,
                                                                12 * s.parameters // 8)
    cpu, _ = make_plan(compose_config(), 1, 80, None)
    s = cpu.worst
    assert (s.param_bytes, s.grad_bytes, s.optimizer_bytes, s.engine_buffers) == (
        4 * s.parameters, 4 * s.parameters, 8 * s.parameters, 0)


@pytest.mark.parametrize("argv, line", [
    (["--world-size", "8"], "error: --world-size=8: is an option of --plan"),
    (["--plan", "--gpu-memory", "lots"], "error: --gpu-memory=lots: must be a number (float)"),
    (["--plan", "--mfu", "1.5"], "error: --mfu=1.5: must be > 0 and <= 1"),
    (["--plan", "--config-name=llama_7b_128k", "data.tokenizer=/no/such/tokenizer"],
     "error: data.tokenizer=/no/such/tokenizer: is not on this machine; give the vocabulary with --vocab-size N "
     "for the plan"),
])
def test_plan_options_refused_in_one_line(argv, line, capsys):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == line


def test_trainer_refuses_a_model_that_cannot_fit_in_one_line(tmp_path, capsys):
    """phi3_small on this CPU (fp32 parameters, gradients and AdamW: 16 bytes x 7B, more than any
    CI host): one line, exit 2, before any process group or output."""
    run_dir = tmp_path / "run"
    code = cli.main(["--config-name=phi3_small", *CPU, "parallel.tp=1", f"run.dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: train.device=cpu: a rank needs ") and ": does not fit; " in err[0], err
    assert not run_dir.exists() and not dist.is_initialized()
