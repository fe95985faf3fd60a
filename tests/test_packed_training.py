"""Packed documents in the trainer (data.reset_attention_mask / data.reset_position_ids, Megatron's
names): document boundaries from the end-of-document tokens of a micro batch, a packed micro batch
through the CPU engine against the same documents run one at a time, the tiny_packed recipe's exact
resume and logged FLOPs, and two processes (tp=2, dp=2) against one. (Refusals: test_train_config.py,
test_cli.py.)"""
import itertools
from types import SimpleNamespace

import pytest
import torch
from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
from megatron.core.pipeline_parallel.schedules import get_tensor_shapes

from megatron_s2 import build_gpt_model, training_flops_per_token
from megatron_s2.parallel import model_parallel_session
from megatron_s2.training import pretrain, validate
from megatron_s2.training.config import compose_config
from megatron_s2.training.data import (ByteTokenizer, build_datasets, default_dataset, get_micro_batch,
                                       pack_documents)
from megatron_s2.training.engine import CpuEngine, GpuEngine, _model_forward, schedule_shape
from megatron_s2.training.loop import padded_vocab_size, seed_everything, transformer_config
from test_train_loop import TINY, _losses, _records, _run, _torchrun

E = ByteTokenizer.eod
PACKING = ["data.reset_attention_mask=true", "data.reset_position_ids=true", "data.default_documents=paragraph"]


def _micro_batch(tokens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> dict:
    """A micro batch as get_micro_batch gives it (labels: any tokens, here tokens + 1000)."""
    b, s = tokens.shape
    return {"tokens": tokens, "labels": tokens + 1000,
            "loss_mask": torch.ones(b, s) if loss_mask is None else loss_mask,
            "position_ids": torch.arange(s).expand(b, s)}


# -- boundaries --------------------------------------------------------------------------------------
def test_boundaries_by_hand():
    """EOD at a sample's last position, two EODs in a row (at a sample's start and inside one), a
    sample without EOD, micro batch 4: a document ends at and includes an EOD; samples start one."""
    tokens = torch.tensor([[1, 2, E, 3, 4, E],
                           [E, E, 5, 6, 7, 8],
                           [1, 2, 3, 4, 5, 6],
                           [7, E, E, 8, E, 9]])
    pack, lengths = pack_documents(_micro_batch(tokens), E)
    assert lengths == [[3, 3], [1, 1, 4], [6], [2, 1, 2, 1]]
    assert pack["cu_seqlens"].dtype == torch.int32
    assert pack["cu_seqlens"].tolist() == [0, 3, 6, 7, 8, 12, 18, 20, 21, 23, 24]
    assert pack["max_seqlen"] == 6 and type(pack["max_seqlen"]) is int
    assert pack["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 0, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5,
                                              0, 1, 0, 0, 1, 0]]
    assert pack["tokens"].tolist() == [tokens.reshape(-1).tolist()]
    assert pack["labels"].tolist() == [(tokens.reshape(-1) + 1000).tolist()]
    assert pack["loss_mask"].shape == (1, 24)


@pytest.mark.parametrize("seed", range(3))
def test_boundaries_match_megatron_masks(seed):
    """Against Megatron's own _get_ltor_masks_and_position_ids per sample (reset_position_ids and
    reset_attention_mask): the same position ids, and the block-diagonal causal mask of
    cu_seqlens over the pack equals Megatron's mask of each sample (nothing across samples)."""
    gen = torch.Generator().manual_seed(seed)
    b, s = 3, 40
    tokens = torch.where(torch.rand(b, s, generator=gen) < 0.15, E, torch.randint(0, 256, (b, s), generator=gen))
    pack, lengths = pack_documents(_micro_batch(tokens), E)
    document = torch.repeat_interleave(torch.arange(len(pack["cu_seqlens"]) - 1), torch.diff(pack["cu_seqlens"]))
    causal = torch.ones(b * s, b * s).tril().bool()
    allowed = causal & (document[:, None] == document[None, :])
    for i in range(b):
        masked, _, positions = _get_ltor_masks_and_position_ids(
            tokens[i], E, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=False,
            create_attention_mask=True)
        assert pack["position_ids"][0, i * s:(i + 1) * s].tolist() == positions.tolist()
        block = allowed[i * s:(i + 1) * s, i * s:(i + 1) * s]
        assert torch.equal(block, ~masked[0]), (seed, i)
        assert not allowed[i * s:(i + 1) * s].sum() - block.sum()     # nothing outside the sample
        assert sum(lengths[i]) == s
    assert pack["max_seqlen"] == max(itertools.chain(*lengths))


# -- the engine --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["DSSD", "SD"])
def test_packed_micro_batch_equals_documents_one_at_a_time(layout):
    """CpuEngine.forward_backward on a packed micro batch (b=3) gives the loss and gradients of the
    same documents run through the model one at a time as [1, len] sequences (positions from 0),
    loss-masked the same way. Documents are multiples of the block size (the unpacked S2 path
    takes only those). The same tokens unpacked give other gradients: packing matters."""
    cfg = validate(compose_config(TINY + [f"model.num_layers={len(layout)}", f"attention.layout={layout}",
                                          "train.seq_length=64", *PACKING]), world_size=1)
    with model_parallel_session(1):
        torch.manual_seed(0)
        model = build_gpt_model(transformer_config(cfg), cfg.attention.s2, layout,
                                vocab_size=padded_vocab_size(E + 1, cfg), max_sequence_length=64)
        engine = CpuEngine(model, cfg)
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 256, (3, 64), generator=gen)
        for sample, position in ((0, 15), (1, 31), (1, 63)):       # documents 16+48 | 32+32 | 64
            tokens[sample, position] = E
        batch = _micro_batch(tokens, (torch.rand(3, 64, generator=gen) > 0.3).float())
        batch["labels"] = torch.randint(0, 256, (3, 64), generator=gen)
        pack, lengths = pack_documents(batch, E)
        assert lengths == [[16, 48], [32, 32], [64]]

        packed_loss = engine.forward_backward([pack])
        packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

        model.zero_grad()
        flat = {k: v.reshape(-1) for k, v in batch.items()}
        bounds = pack["cu_seqlens"].tolist()
        loss_sum = sum((model(flat["tokens"][a:b][None], torch.arange(b - a)[None], None,
                              labels=flat["labels"][a:b][None])[0] * flat["loss_mask"][a:b]).sum()
                       for a, b in zip(bounds[:-1], bounds[1:]))
        (loss_sum / flat["loss_mask"].sum()).backward()
        assert packed_loss == pytest.approx((loss_sum / flat["loss_mask"].sum()).item(), rel=1e-6)
        for name, param in model.named_parameters():
            torch.testing.assert_close(packed_grads[name], param.grad, atol=1e-6, rtol=1e-4,
                                       msg=lambda m: f"{name}: {m}")
        engine.forward_backward([batch])
        moved = max(((p.grad - packed_grads[n]).abs().max() / packed_grads[n].abs().max()).item()
                    for n, p in model.named_parameters())
        assert moved > 1e-2, moved


@pytest.mark.gpu
def test_gpu_engine_on_a_pack_equals_cpu_engine():
    """On CUDA (fp32, one process): GpuEngine (Megatron DDP, distributed optimizer, schedules; its
    forward_step) gives CpuEngine's loss and gradient norm on the same packed micro batches and
    the same weights (drawn on the CPU); CpuEngine's packing is checked above."""
    cfg = validate(compose_config(TINY + PACKING + ["train.device=cuda", "train.precision=fp32"]), world_size=1)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.where(torch.rand(4, 128, generator=gen) < 0.02, E, torch.randint(0, 256, (4, 128), generator=gen))
    packs = [pack_documents(_micro_batch(tokens[i:i + 2]), E)[0] for i in (0, 2)]
    packs = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in p.items()} for p in packs]
    results = {}
    with model_parallel_session(1):
        for name in ("cpu", "gpu"):
            seed_everything(cfg.train.seed, cuda=True)
            config = transformer_config(cfg)
            config.use_cpu_initialization = True
            model = build_gpt_model(config, cfg.attention.s2, cfg.attention.layout,
                                    vocab_size=padded_vocab_size(E + 1, cfg), max_sequence_length=128).cuda()
            engine = CpuEngine(model, cfg) if name == "cpu" else GpuEngine(model, cfg, config)
            results[name] = (engine.forward_backward(packs), engine.grad_norm())
    assert results["gpu"] == pytest.approx(results["cpu"], rel=1e-4), results


def test_pipeline_buffers_are_the_size_of_a_packs_hidden_states():
    """Under packing Megatron's pipeline schedules must size their send/receive buffers as the
    hidden states a first pipeline stage (no output layer) gives for a pack: [b*s, 1, hidden]."""
    cfg = validate(compose_config(TINY + PACKING), world_size=1)
    with model_parallel_session(1):
        config = transformer_config(cfg)
        stage = build_gpt_model(config, cfg.attention.s2, cfg.attention.layout, vocab_size=padded_vocab_size(E + 1, cfg),
                                max_sequence_length=cfg.train.seq_length, post_process=False)
        tokens = torch.randint(0, 256, (cfg.train.micro_batch_size, cfg.train.seq_length))
        tokens[0, 40] = E
        pack, _ = pack_documents(_micro_batch(tokens), E)
        hidden = _model_forward(stage, pack)
        shapes = get_tensor_shapes(**schedule_shape(cfg), decoder_seq_length=None, config=config,
                                   tp_group=SimpleNamespace(size=lambda: 1), cp_group=SimpleNamespace(size=lambda: 1))
    assert shapes == [tuple(hidden.shape)] == [(2 * 128, 1, cfg.model.hidden_size)]


# -- the recipe --------------------------------------------------------------------------------------
SHORT = ["train.iters=6", "train.lr_decay_iters=6", "train.warmup_iters=1", "train.eval_interval=6",
         "logging.interval=1", "logging.wandb.mode=disabled"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("s2cache"))


def _run_recipe(run_dir, cache_dir, *overrides) -> dict:
    cfg = validate(compose_config([*SHORT, f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", *overrides],
                                  recipe="tiny_packed"), world_size=1)
    return pretrain(cfg)


def test_recipe_resumes_exactly_and_logs_document_flops(tmp_path, cache_dir):
    """tiny_packed: 6 iterations straight == 3, then resumed to 6 (every training loss and the final
    validation loss, i.e. the final weights, bit for bit). The logged TFLOP/s of step 1 use its
    own documents: its FLOPs per token equal the mean of training_flops_per_token over the first
    global batch's packed samples, recomputed here, and lie below the unpacked figure."""
    straight = _run_recipe(tmp_path / "straight", cache_dir)
    _run_recipe(tmp_path / "resumed", cache_dir, "train.iters=3")
    resumed = _run_recipe(tmp_path / "resumed", cache_dir)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    assert sorted(_losses(tmp_path / "straight")) == list(range(1, 7))
    assert resumed["val_loss"] == straight["val_loss"] and resumed["iteration"] == 6

    cfg = validate(compose_config([*SHORT, f"data.cache_dir={cache_dir}"], recipe="tiny_packed"), world_size=1)
    t, tokenizer = cfg.train, ByteTokenizer()
    train, _ = build_datasets([default_dataset(cache_dir, tokenizer, "paragraph")], None, [], cfg.data.split,
                              tokenizer, seq_length=t.seq_length, seed=t.seed,
                              num_train_samples=t.iters * t.global_batch_size,
                              num_valid_samples=t.eval_iters * t.global_batch_size, cache_dir=cache_dir)
    _, lengths = pack_documents(get_micro_batch(train, 0, t.global_batch_size), E)
    assert max(len(sample) for sample in lengths) > 1
    args = (transformer_config(cfg), cfg.attention.layout, cfg.attention.s2, t.seq_length,
            padded_vocab_size(tokenizer.vocab_size, cfg))
    expected = sum(training_flops_per_token(*args, document_lengths=d).sparse for d in lengths) / len(lengths)
    first = _records(tmp_path / "straight")[0]
    assert first["iteration"] == 1
    logged = first["tflops_per_device"] * 1e12 / first["tokens_per_sec"]
    assert logged == pytest.approx(expected, rel=1e-9)
    assert logged < training_flops_per_token(*args).sparse


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["parallel.tp=2", "parallel.tp=1"], ids=["tp2", "dp2"])
def test_packed_two_processes_match_one(tmp_path, cache_dir, parallel):
    """Packed training on two gloo processes (tp=2, or dp=2) gives the single-process losses (fp32,
    same seed; the vocabulary padded to one size), and the TFLOP/s logged by rank 0 count the
    documents of the whole global batch (dp: both ranks' samples, all-reduced)."""
    tp = int(parallel.split("=")[1])
    common = [*PACKING, "train.iters=4", "train.lr_decay_iters=4"]
    _run(tmp_path / "single", cache_dir, *common, "model.make_vocab_size_divisible_by=256")
    _torchrun(tmp_path, tmp_path / "pair", cache_dir, *common, parallel, f"model.make_vocab_size_divisible_by={256 // tp}")
    single, pair = _records(tmp_path / "single"), _records(tmp_path / "pair")
    assert [r["iteration"] for r in pair] == [1, 2, 3, 4]
    for one, two in zip(single, pair):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5), (single, pair)
        flops_one = one["tflops_per_device"] / one["tokens_per_sec"]
        flops_two = two["tflops_per_device"] * 2 / two["tokens_per_sec"]      # per device, 2 devices
        assert flops_two == pytest.approx(flops_one, rel=1e-9)


# -- data.eod_mask_loss ------------------------------------------------------------------------------
@pytest.mark.parametrize("eod_mask_loss", [True, False])
def test_eod_mask_loss_is_megatrons(cache_dir, eod_mask_loss):
    """data.eod_mask_loss through build_datasets and pack_documents: every sample's loss mask and
    position ids are those of Megatron's _get_ltor_masks_and_position_ids (reset_position_ids,
    reset_attention_mask, eod_mask_loss) on the sample's tokens; with it set, the positions whose
    input is an EOD (their target: the next document's first token) carry no loss."""
    tokenizer, seq = ByteTokenizer(), 128
    train, _ = build_datasets([default_dataset(cache_dir, tokenizer, "paragraph")], None, [], "98,2,0", tokenizer,
                              seq_length=seq, seed=1, num_train_samples=8, num_valid_samples=0,
                              cache_dir=cache_dir, eod_mask_loss=eod_mask_loss)
    batch = get_micro_batch(train, 0, 8)
    pack, _ = pack_documents(batch, E)
    for i, tokens in enumerate(batch["tokens"]):
        _, loss_mask, positions = _get_ltor_masks_and_position_ids(
            tokens, E, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=eod_mask_loss,
            create_attention_mask=False)
        assert torch.equal(pack["loss_mask"][0, i * seq:(i + 1) * seq], loss_mask)
        assert torch.equal(pack["position_ids"][0, i * seq:(i + 1) * seq], positions)
    eods = batch["tokens"] == E
    assert eods.any()
    assert (batch["loss_mask"][eods] == 0).all() if eod_mask_loss else batch["loss_mask"].all()


def test_trainer_passes_eod_mask_loss(tmp_path, cache_dir, monkeypatch):
    """The key reaches the datasets (the loop's only use of it)."""
    import megatron_s2.training.loop as loop

    seen = {}

    def stop(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "build_datasets", stop)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run", cache_dir, *PACKING, "data.eod_mask_loss=true")
    assert seen["eod_mask_loss"] is True
