"""Export: a run as a Hugging Face model that generates, through the user's commands.

A random Llama (tests/hf_models.py) starts a hybrid DSDS run (``scripts/convert_hf.py recipe``,
then ``scripts/pretrain.py --config-path``) that trains one step at learning rate 0, so its weights
stay the source's; ``scripts/convert_hf.py export`` writes it back. Checked: Hugging Face -> ours ->
Hugging Face gives the source's tensors bit for bit (also from tp=2 and pp=2 checkpoints, slow);
the exported hybrid's fp32 logits equal our model's (max relative error 1e-5) loaded in-package
(``S2LlamaForCausalLM``; ``LlamaForCausalLM`` with ``attn_implementation="s2"``) and as
lm-evaluation-harness loads it (``trust_remote_code``, megatron_s2 unimportable:
tests/multiproc/hf_remote_code_check.py), where ``generate`` with the KV cache gives the greedy
tokens of full recomputation for one prompt and a left-padded batch of two (each padded row as it
generates alone), and the S layers of a 330-token prompt run through s2attn's kernel.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from hf_models import max_relative_error, save_hf_model  # noqa: E402

from megatron_s2.hf import cli as convert_cli  # noqa: E402
from megatron_s2.training import cli as pretrain_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHECK = Path(__file__).parent / "multiproc" / "hf_remote_code_check.py"
LAYOUT = "DSDS"
RUN = ["train.seq_length=64", "train.iters=1", "train.lr=0", "train.min_lr=0", "train.warmup_iters=0",
       "train.micro_batch_size=2", "train.eval_interval=0", "attention.s2.block_size=16",
       "attention.s2.local_blocks=2", "attention.s2.vert_stride=2", "logging.wandb.mode=disabled"]


def _corpus(folder: Path, root: Path) -> str:
    """A small dataset of stdlib source prepared with the folder's (byte-level) tokenizer."""
    import sysconfig

    from megatron_s2.training.data import HFTokenizer, prepare_dataset
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(stdlib / name) for name in ("abc.py", "bisect.py", "colorsys.py", "heapq.py", "keyword.py")]
    prefix = str(root / "corpus")
    prepare_dataset(files, prefix, HFTokenizer(str(folder)), text_documents="file", progress=False)
    return prefix


def _train(root: Path, source: Path, run_dir: Path, *overrides) -> None:
    assert pretrain_cli.main(["--config-path", str(root / "recipes"), "--config-name", "from_source",
                              f"run.dir={run_dir}", *overrides]) == 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(root, source folder, run dir, export dir) of the tp=1 run."""
    root = tmp_path_factory.mktemp("hf_export")
    source = root / "source"
    save_hf_model(source, "llama", layers=4)
    prefix = _corpus(source, root)
    assert convert_cli.main(["recipe", str(source), "--layout", LAYOUT, "--out", str(root / "recipes" / "from_source.yaml"),
                             *RUN, f"data.prefixes=[{prefix}]", f"data.cache_dir={root / 'cache'}"]) == 0
    _train(root, source, root / "run")
    assert convert_cli.main(["export", str(root / "run"), str(root / "export")]) == 0
    return root, source, root / "run", root / "export"


def _same_tensors(export: Path, source: Path) -> None:
    from safetensors.torch import load_file
    got, want = load_file(export / "model.safetensors"), load_file(source / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def test_export_folder_is_a_hugging_face_checkpoint(exported):
    _, source, _, export = exported
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["S2LlamaForCausalLM"] and config["model_type"] == "s2_llama"
    assert config["s2"] == {"layout": LAYOUT, "block_size": 16, "local_blocks": 2, "vert_stride": 2,
                            "head_sliding_offset": 0, "head_sliding_step": None, "num_dense_heads": 0,
                            "homo_head": False, "head_sharding": "kv"}
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_s2.S2LlamaForCausalLM"
    assert {"model.safetensors", "tokenizer.json", "modeling_s2.py", "s2_layout.py"} <= set(os.listdir(export))
    _same_tensors(export, source)


def _our_logits(run_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_s2.evaluation.checkpoints import logits_function, trained_model
    with trained_model(str(run_dir)) as (model, _, _), torch.no_grad():
        return logits_function(model)(tokens)


@pytest.fixture(scope="module")
def expected(exported, tmp_path_factory):
    """Our model's logits on 2 x 128 random tokens (8 blocks: the S layers are sparse there)."""
    tokens = torch.randint(0, 257, (2, 128), generator=torch.Generator().manual_seed(5))
    path = tmp_path_factory.mktemp("expected") / "expected.pt"
    torch.save({"tokens": tokens, "logits": _our_logits(exported[2], tokens)}, path)
    return path


def test_exported_hybrid_logits_equal_ours_in_package(exported, expected):
    from transformers import LlamaForCausalLM

    from megatron_s2.hf.modeling_s2 import S2LlamaForCausalLM

    want = torch.load(expected)
    export = exported[3]
    with torch.no_grad():
        for model in (S2LlamaForCausalLM.from_pretrained(export),
                      LlamaForCausalLM.from_pretrained(export, attn_implementation="s2")):
            assert max_relative_error(model.eval()(want["tokens"]).logits, want["logits"]) <= 1e-5
        dense = LlamaForCausalLM.from_pretrained(export, attn_implementation="sdpa").eval()
        assert max_relative_error(dense(want["tokens"]).logits, want["logits"]) > 1e-2    # the S layers matter


def test_remote_code_without_our_package_generates_like_full_recomputation(exported, expected, tmp_path):
    out = tmp_path / "remote.json"
    proc = subprocess.run([sys.executable, str(CHECK), str(exported[3]), str(expected), str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["class"], r["attn_implementation"]) == ("S2LlamaForCausalLM", "s2")
    assert r["logits_error"] <= 1e-5
    assert r["batch1"]["cache"] == r["batch1"]["recompute"]
    assert len(set(r["batch1"]["cache"][0])) >= 3                       # not one token repeated
    assert r["padded"]["cache"] == r["padded"]["recompute"] == r["padded"]["alone"]
    long = r["long"]
    assert long["cache"] == long["recompute"]
    # 2 S layers x (prefill + 2 decode steps), each over every key so far.
    assert sorted(long["kernel_key_lengths"]) == sorted(2 * [long["prompt"], long["prompt"] + 1, long["prompt"] + 2])
    assert r["fallback_error"] <= 1e-5 and r["fallback_warned"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["parallel.tp=2", "parallel.pp=2"])
def test_export_from_a_model_parallel_checkpoint_is_identical(exported, parallel, tmp_path):
    root, source, _, _ = exported
    if parallel == "parallel.tp=2":
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(REPO / "scripts" / "pretrain.py"), "--config-path", str(root / "recipes"),
                               "--config-name", "from_source", f"run.dir={tmp_path / 'run'}", parallel],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    else:
        from torchrun import run_workers
        run_workers(Path(__file__).parent / "multiproc" / "pipeline_checkpoint_worker.py", 2, tmp_path / "done.json",
                    str(root / "recipes"), str(tmp_path / "run"))
    assert convert_cli.main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    _same_tensors(tmp_path / "export", source)


def test_s2_layers_read_padding_and_refuse_other_masks():
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    from megatron_s2.hf.modeling_s2 import real_token_runs

    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = sdpa_mask(batch_size=3, q_length=6, kv_length=6, attention_mask=padding, allow_is_causal_skip=False)
    assert real_token_runs(mask, 3, 6, 6) == [(2, 6), (0, 4), (0, 6)]
    decode = sdpa_mask(batch_size=3, q_length=1, kv_length=6, q_offset=5, attention_mask=padding, allow_is_causal_skip=False)
    assert real_token_runs(decode, 3, 1, 6) == [(2, 6), (0, 4), (0, 6)]
    packed = mask.clone()
    packed[:, :, 3:, :3] = False                 # two documents in one row
    with pytest.raises(ValueError, match="causal attention with padding only"):
        real_token_runs(packed, 3, 6, 6)
    static = sdpa_mask(batch_size=1, q_length=1, kv_length=8, q_offset=3, mask_function=causal_mask_function,
                       allow_is_causal_skip=False)            # a StaticCache: slots 4-7 not written yet
    with pytest.raises(ValueError, match="newest keys"):
        real_token_runs(static, 1, 1, 8)
