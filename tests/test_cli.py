"""The command line's refusals (docs/RELIABILITY.md, "Bad input"): every case is one line on stderr,
``error: <key>=<value>: <reason>``, exit status 2, no traceback, nothing on stdout, and run.dir
untouched (a fresh one not even created). Runs ``megatron_s2.training.cli.main`` (what
scripts/pretrain.py calls) in-process for the table, the script itself and torchrun for the
process-level shape; --help lists the recipes and the stable keys."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_s2.training import checkpoint as ckpt
from megatron_s2.training.cli import main
from megatron_s2.training.config import compose_config, validate
from megatron_s2.training.data import ByteTokenizer, prepare_dataset
from megatron_s2.training.errors import ConfigError
from megatron_s2.training.loop import padded_vocab_size, run_meta
from test_train_loop import PRETRAIN, _env


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small byte-level dataset, a copy with its .bin cut short, and a copy whose metadata says
    a Hugging Face tokenizer made it (what scripts/prepare_data.py --tokenizer DIR writes)."""
    root = tmp_path_factory.mktemp("data")
    (root / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    prepare_dataset([str(root / "a.txt")], str(root / "a"), ByteTokenizer(), progress=False)
    for copy in ("cut", "hf"):
        for ext in (".bin", ".idx", ".json"):
            shutil.copy(root / f"a{ext}", root / f"{copy}{ext}")
    os.truncate(root / "cut.bin", os.path.getsize(root / "cut.bin") - 100)
    meta = json.loads((root / "hf.json").read_text())
    (root / "hf.json").write_text(json.dumps({**meta, "tokenizer": {"class": "HFTokenizer", "path": "/models/tok"}}))
    return root


def _fake_checkpoint(run_dir, iteration: int, *overrides: str) -> None:
    """A complete checkpoint's marker (run.json) of the tiny recipe with ``overrides``: enough for
    the refusals, which read only run.json."""
    cfg = validate(compose_config(list(overrides)), world_size=1)
    meta = run_meta(cfg, 1, padded_vocab_size(ByteTokenizer.vocab_size, cfg))
    path = ckpt.iter_dir(str(run_dir / "checkpoints"), iteration)
    os.makedirs(path)
    with open(os.path.join(path, ckpt.META_FILE), "w") as f:
        json.dump({**meta, "iteration": iteration}, f)


def _snapshot(directory) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


# (id, command-line arguments, WORLD_SIZE, the start of the one line after "error: ", words in it)
REFUSALS = [
    ("unknown key", ["train.itres=5"], 1, "train.itres=5: no such key", ["did you mean train.iters?"]),
    ("added unknown key", ["+train.itres=5"], 1, "train.itres=5: no such key", ["did you mean train.iters?"]),
    ("wrong type", ["train.iters=many"], 1, "train.iters=many: ", ["Integer"]),
    ("bad enum", ["logging.wandb.mode=sometimes"], 1, "logging.wandb.mode=sometimes: ", ["offline"]),
    ("malformed override", ["train.iters"], 1, "train.iters=: is not an override", ["key=value"]),
    ("unknown recipe", ["--config-name=tinyy"], 1, "--config-name=tinyy: no such recipe", ["tiny"]),
    ("unknown option", ["--bogus"], 1, "option=--bogus: unknown", ["--config-name"]),
    ("seq length off the block grid", ["train.seq_length=100"], 1, "train.seq_length=100: ",
     ["attention.s2.block_size = 16"]),
    ("seq length off the CP grid", ["parallel.cp=2", "train.seq_length=96"], 2, "train.seq_length=96: ",
     ["2 * parallel.cp (2)"]),
    ("heads vs tp", ["parallel.tp=8", "model.num_query_groups=4"], 8, "model.num_attention_heads=4: ",
     ["parallel.tp (8)"]),
    ("kv groups vs tp", ["parallel.tp=4"], 4, "model.num_query_groups=2: ", ["parallel.tp (4)"]),
    ("dense heads vs kv heads", ["attention.s2.num_dense_heads=3"], 1, "attention.s2.num_dense_heads=3: ",
     ["model.num_query_groups (2)"]),
    ("layout length", ["attention.layout=DSD"], 1, "attention.layout=DSD: ", ["model.num_layers is 4"]),
    ("layout characters", ["attention.layout=DSXS"], 1, "attention.layout=DSXS: ", ["'X'"]),
    ("block size", ["attention.s2.block_size=24"], 1, "attention.s2.block_size=24: ", ["power of two"]),
    ("local blocks", ["attention.s2.local_blocks=0"], 1, "attention.s2.local_blocks=0: ", [">= 1"]),
    ("global batch", ["train.global_batch_size=12"], 1, "train.global_batch_size=12: ", ["null"]),
    ("world size", ["parallel.tp=2"], 3, "parallel.tp=2: ", ["world size (3)"]),
    ("lr below min_lr", ["train.lr=1e-5", "train.min_lr=1e-4"], 1, "train.lr=1e-05: ", ["train.min_lr"]),
    ("bf16 on cpu", ["train.device=cpu", "train.precision=bf16"], 1, "train.precision=bf16: ", ["fp32"]),
    ("missing dataset", ["data.prefixes=[/nonexistent/corpus]"], 1,
     "data.prefixes[0]=/nonexistent/corpus: ", ["prepare_data.py"]),
    ("truncated dataset", ["data.prefixes=[{data}/cut]"], 1, "data.prefixes[0]={data}/cut: ", ["truncated"]),
    ("retrieval data missing", ["--config-name=retrieval_hybrid", "data.prefixes=[{tmp}/none/train]"], 1,
     "data.prefixes[0]={tmp}/none/train: {tmp}/none/train.bin does not exist (make it with python "
     "scripts/eval_retrieval.py generate --out data/retrieval)", []),
    ("missing tokenizer", ["data.tokenizer=/nonexistent/tokenizer"], 1, "data.tokenizer=/nonexistent/tokenizer: ",
     ["'byte'"]),
    ("loss ids outside the vocabulary", ["data.loss_token_ids=[65,257]"], 1, "data.loss_token_ids=[65,257]: ",
     ["[0, 257)"]),
    ("packing flags differ", ["data.reset_attention_mask=true"], 1, "data.reset_attention_mask=true: ",
     ["needs data.reset_position_ids=true too"]),
    ("packing with context parallelism", ["parallel.cp=2", "data.reset_attention_mask=true",
                                          "data.reset_position_ids=true"], 1,
     "data.reset_attention_mask=true: packed documents are not supported with parallel.cp > 1", []),
    ("run.dir not writable", ["run.dir={tmp}/a_file/run"], 1, "run.dir={tmp}/a_file/run: ", ["not a directory"]),
    ("fresh run over checkpoints", ["checkpoint.resume=false", "run.dir={tmp}/done"], 1,
     "checkpoint.resume=false: ", ["iter_0000004"]),
    ("another model than the checkpoint", ["attention.layout=SSSS", "train.iters=50", "run.dir={tmp}/done"], 1,
     "attention.layout=SSSS: {tmp}/done/checkpoints/iter_0000004 was saved with attention.layout=DSDS",
     ["its own run.dir"]),
    ("another S2 config than the checkpoint", ["attention.s2.local_blocks=2", "run.dir={tmp}/done"], 1,
     "attention.s2.local_blocks=2: ", ["attention.s2.local_blocks=4"]),
    ("heads leave older blocks unseen", ["attention.s2.vert_stride=4"], 1, "attention.s2.vert_stride=4: ",
     ["attention.s2.allow_uncovered_context=true"]),
    ("dataset of another tokenizer", ["data.prefixes=[{data}/hf]"], 1,
     "data.tokenizer=byte: dataset '{data}/hf' was prepared with tokenizer {{'class': 'HFTokenizer'", ["set data.tokenizer"]),
    ("run.dir that cannot be created", ["run.dir=/proc/megatron_s2/run"], 1,
     "run.dir=/proc/megatron_s2/run: cannot create a directory in /proc", []),
    ("another schedule than the checkpoint", ["train.iters=50", "run.dir={tmp}/done"], 1,
     "train.lr_decay_iters=50: {tmp}/done/checkpoints/iter_0000004 was trained with train.lr_decay_iters=300 (null: "
     "train.iters)", ["train.use_checkpoint_opt_param_scheduler=true", "train.override_opt_param_scheduler=true"]),
    ("another data-parallel size than the checkpoint", ["run.dir={tmp}/done"], 2,
     "train.global_batch_size=16: null makes it micro batch x dp = 8 x 2 here, but {tmp}/done/checkpoints/iter_0000004 "
     "was trained with a global batch of 8", ["set train.global_batch_size=8 train.micro_batch_size=4"]),
    ("both schedule choices", ["train.override_opt_param_scheduler=true", "train.use_checkpoint_opt_param_scheduler=true"],
     1, "train.override_opt_param_scheduler=true: and train.use_checkpoint_opt_param_scheduler=true contradict", []),
    ("exit interval", ["train.exit_interval=0"], 1, "train.exit_interval=0: must be > 0 or null", []),
]


@pytest.mark.parametrize("args, world_size, start, words", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_are_one_line(tmp_path, dataset, monkeypatch, capsys, args, world_size, start, words):
    (tmp_path / "a_file").write_text("not a directory")
    _fake_checkpoint(tmp_path / "done", 4)
    before = _snapshot(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    fill = dict(tmp=tmp_path, data=dataset)
    args = [a.format(**fill) for a in args]
    if not any(a.startswith("run.dir=") for a in args):
        args.append(f"run.dir={tmp_path}/fresh")

    status = main(args)

    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert err.startswith("error: " + start.format(**fill)) and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    assert not os.path.exists(tmp_path / "fresh")
    assert _snapshot(tmp_path) == before


def test_debug_switch_raises_with_the_traceback(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError, match="attention.layout=DSXS"):
        main(["attention.layout=DSXS"])


def test_rerun_of_a_complete_run_creates_nothing(tmp_path, capsys):
    """A checkpoint at train.iters: say so and how to continue (the command that keeps the schedule,
    and what the other choice changes: tests/test_console.py runs that command); exit 0; nothing
    written."""
    run_dir = tmp_path / "done"
    _fake_checkpoint(run_dir, 300)
    before = _snapshot(run_dir)
    assert main([f"run.dir={run_dir}"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"run.dir {run_dir} is complete: its checkpoint iter_0000300 is at train.iters=300, "
                          "nothing to do. To train on with the same schedule (lr 0.0003 from step 301): python "
                          "scripts/pretrain.py train.iters=600 train.use_checkpoint_opt_param_scheduler=true; with "
                          "train.override_opt_param_scheduler=true instead, this config's schedule applies from step "
                          "301 (lr 0.00172 there, decaying over the new train.iters)"), out
    assert err == ""
    assert _snapshot(run_dir) == before


def test_help_lists_recipes_and_stable_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for line in ("  tiny ", "  phi3_small ", "  train.global_batch_size ", "  attention.layout ",
                 "  logging.wandb.mode "):
        assert line in out, out
    assert "Configuration groups" not in out


def test_script_and_torchrun_refuse_in_one_line(tmp_path):
    """The script: exit 2, one line, no traceback, no Megatron notices. Under torchrun (2 ranks)
    our line appears once (rank 0), whatever torchrun adds about the failed workers, and every rank
    exits 2 (torchrun's SIGTERM to the slower one waits for its verdict)."""
    script = subprocess.run([sys.executable, PRETRAIN, "attention.layout=DSXS", f"run.dir={tmp_path}/run"],
                            env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert script.returncode == 2
    assert script.stderr == ("error: attention.layout=DSXS: may only contain 'S' (sparse) and 'D' (dense), "
                             "found ['X']\n")
    assert script.stdout == ""
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               PRETRAIN, "attention.layout=DSXS", f"run.dir={tmp_path}/run"],
                              env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert launched.returncode != 0
    report = launched.stdout + launched.stderr
    assert report.count("error: attention.layout=DSXS") == 1
    # torchrun's failure report: both ranks refused (2), none was killed by its SIGTERM (-15).
    assert report.count("exitcode  : 2 ") == 2 and "exitcode  : -15" not in report, report[-3000:]
    assert not os.path.exists(tmp_path / "run")
