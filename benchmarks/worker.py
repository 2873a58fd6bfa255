"""One training benchmark candidate in a fresh process (so peak memory is its own). Prints one JSON
line: tokens/s (median over steps after the first), examples/s and peak memory in MiB.

    python -m benchmarks.worker '{"kind": "ours", "steps": 6, "batch": 4, "length": 256}'

kinds: ours | hf_loop | hf_trainer (LM on random tokens), ours_sft | trl_sft (the bundled
instruction set), ours_lora | hf_peft (LoRA r=8 on c_attn,c_proj). "masked": 0.5 masks the first
half of every row's labels (ours) to show the cost of skipping the vocabulary projection there.
"clock": "cpu" times steps in this process's CPU seconds (time.process_time) instead of wall seconds, and
"threads": N sets torch's threads: with one thread, tokens per CPU-second is a per-core rate that other
work on a shared machine barely moves. "dtype": "float32" | "bfloat16" is the compute dtype of every kind (bf16 autocast over fp32 master
weights on both sides; default: bf16 on a GPU, fp32 on a CPU). kind "peak" times the matrix
products of one GPT-2 124M training step (batch x length tokens) in that dtype and prints FLOP/s.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.common import peak_memory_mb, sync

LORA = dict(r=8, alpha=16.0, dropout=0.0, targets=("c_attn", "c_proj"))
clock = time.perf_counter  # or time.process_time ("clock": "cpu"); set in __main__


def device_and_dtype(cfg: dict):
    """The device, and the compute dtype the config names (default bf16 on a GPU, fp32 on a CPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = cfg.get("dtype") or ("bfloat16" if device.type == "cuda" else "float32")
    return device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def dtype_name(cfg: dict) -> str:
    return str(device_and_dtype(cfg)[1]).removeprefix("torch.")


class RandomBlocks:
    """Random token rows, fixed per index; labels optionally masked on the first `masked` share."""

    def __init__(self, n: int, length: int, masked: float = 0.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, 50257, (n, length + 1), generator=g)
        self.masked = int(length * masked)

    def __len__(self):
        return len(self.tokens)

    def batch(self, idx):
        rows = self.tokens[list(idx)]
        labels = rows[:, 1:].clone()
        labels[:, : self.masked] = -100
        return {"input_ids": rows[:, :-1], "labels": labels}


def per_step_rates(step_times: list[float], tokens_per_step: int) -> float:
    return statistics.median(tokens_per_step / t for t in step_times[1:])


def run_ours(cfg: dict) -> list[float]:
    """Our real loop (train.train); per-step throughput comes from its own metrics.jsonl."""
    from gpt2ft.config import preset
    from gpt2ft.lora import LoRAConfig, apply_lora
    from gpt2ft.model import GPT
    from gpt2ft.objectives import MaskedLM
    from gpt2ft.tokenizer import gpt2_tokenizer
    from gpt2ft.train import TrainConfig, train

    torch.manual_seed(0)
    model = GPT(preset("gpt2", dropout=0.0, block_size=max(cfg["length"], 1024)))
    if cfg["kind"] == "ours_lora":
        apply_lora(model, LoRAConfig(**LORA))
    objective = MaskedLM()
    objective.train = RandomBlocks(cfg["batch"] * (cfg["steps"] + 1), cfg["length"], cfg.get("masked", 0.0))
    objective.val = None
    out = tempfile.mkdtemp()
    tc = TrainConfig(out=out, max_steps=cfg["steps"], batch_size=cfg["batch"], log_every=1, eval_every=0,
                     save_every=10**9, progress=False, warmup_steps=0, compile=cfg.get("compile", False),
                     gradient_checkpointing=cfg.get("checkpointing", False), dtype=dtype_name(cfg))
    if clock is not time.perf_counter:  # the loop's own per-step rate, on this clock
        import types

        import gpt2ft.train.loop as loop

        loop.time = types.SimpleNamespace(time=clock)
    train(model, gpt2_tokenizer(), objective, tc, {}, {})
    rates = [json.loads(l)["tokens_per_s"] for l in open(f"{out}/metrics.jsonl") if "tokens_per_s" in l]
    return rates


def run_hf_loop(cfg: dict) -> list[float]:
    """A plain transformers loop: GPT2LMHeadModel(labels=...) + torch AdamW (fused, as ours), autocast
    in the config's dtype; "kept": True runs it inside our loop's allocator setting (freed_memory_kept);
    "compile": True compiles the model."""
    from gpt2ft.runtime import freed_memory_kept

    with freed_memory_kept(cfg.get("kept", False)):
        return _hf_loop(cfg)


def _hf_loop(cfg: dict) -> list[float]:
    from transformers import GPT2Config, GPT2LMHeadModel

    device, dtype = device_and_dtype(cfg)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="sdpa", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                       n_positions=max(cfg["length"], 1024))).to(device).train()
    if cfg["kind"] == "hf_peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                 target_modules=list(LORA["targets"]), fan_in_fan_out=True))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    if cfg.get("compile"):  # torch.compile of the model (its first step compiles, not timed)
        model = torch.compile(model)
    data = RandomBlocks(cfg["batch"] * (cfg["steps"] + 1), cfg["length"])
    times = []
    for step in range(cfg["steps"]):
        batch = {k: v.to(device) for k, v in data.batch(range(step * cfg["batch"], (step + 1) * cfg["batch"])).items()}
        sync()
        start = clock()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(clock() - start)
    return [cfg["batch"] * cfg["length"] / t for t in times]


class _StepTimer:
    """A transformers TrainerCallback that records the wall time of every optimizer step."""

    def __init__(self):
        self.times, self._start = [], None

    def hook(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *a, **k):
                sync()
                timer._start = clock()

            def on_step_end(self, *a, **k):
                sync()
                timer.times.append(clock() - timer._start)

        return Callback()


def run_hf_trainer(cfg: dict) -> list[float]:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    device, dtype = device_and_dtype(cfg)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="sdpa", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                       n_positions=max(cfg["length"], 1024)))
    data = RandomBlocks(cfg["batch"] * (cfg["steps"] + 1), cfg["length"])
    rows = [{k: v[0] for k, v in data.batch([i]).items()} for i in range(len(data))]
    timer = _StepTimer()
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg["batch"],
                             max_steps=cfg["steps"], learning_rate=1e-4, report_to="none", save_strategy="no",
                             logging_strategy="no", bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu",
                             dataloader_num_workers=0, optim="adamw_torch_fused")
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[timer.hook()]).train()
    return [cfg["batch"] * cfg["length"] / t for t in timer.times]


def instruction_rows(max_rows: int | None = None):
    """(prompt, completion) texts of the bundled instruction set, formatted as in SFT."""
    from gpt2ft.commands.demo import DATA_FILE
    from gpt2ft.data.instructions import load_records, prompt_text
    from gpt2ft.templates import get_template

    records, _ = load_records(DATA_FILE)
    template = get_template("instruction-response")
    return records[:max_rows], [(prompt_text(r, template), r.response) for r in records[:max_rows]], template


def run_ours_sft(cfg: dict) -> list[float]:
    """Our SFT objective on the bundled data; examples/s from the per-step token rate."""
    from gpt2ft.config import preset
    from gpt2ft.model import GPT
    from gpt2ft.objectives import InstructionTuning
    from gpt2ft.tokenizer import gpt2_tokenizer
    from gpt2ft.train import TrainConfig, train

    records, _, template = instruction_rows()
    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    model = GPT(preset("gpt2", dropout=0.0))
    objective = InstructionTuning(records, [], tok, template, cfg["length"])
    objective.val = None
    out = tempfile.mkdtemp()
    tc = TrainConfig(out=out, max_steps=cfg["steps"], batch_size=cfg["batch"], log_every=1, eval_every=0,
                     save_every=10**9, progress=False, warmup_steps=0, dtype=dtype_name(cfg))
    train(model, tok, objective, tc, {}, {})
    mean_tokens = sum(len(e.ids) - 1 for row in objective.train.rows for e in row) / len(objective.train)
    return [json.loads(l)["tokens_per_s"] / mean_tokens for l in open(f"{out}/metrics.jsonl") if "tokens_per_s" in l]


def run_trl_sft(cfg: dict) -> list[float]:
    """TRL's SFTTrainer, completion-only loss, same data, model size, batch and max length."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    from trl import SFTConfig, SFTTrainer

    from gpt2ft.tokenizer import gpt2_tokenizer

    device, dtype = device_and_dtype(cfg)
    folder = tempfile.mkdtemp()
    gpt2_tokenizer().save(__import__("pathlib").Path(folder))
    hf_tok = GPT2TokenizerFast.from_pretrained(folder)
    hf_tok.pad_token = hf_tok.eos_token
    _, pairs, _ = instruction_rows()
    data = Dataset.from_list([{"prompt": p, "completion": c + hf_tok.eos_token} for p, c in pairs])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="sdpa", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    timer = _StepTimer()
    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg["batch"], max_steps=cfg["steps"],
                     learning_rate=1e-4, report_to="none", save_strategy="no", logging_strategy="no",
                     completion_only_loss=True, max_length=cfg["length"], packing=False,
                     bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu", dataloader_num_workers=0)
    SFTTrainer(model=model, args=args, train_dataset=data, processing_class=hf_tok, callbacks=[timer.hook()]).train()
    return [cfg["batch"] / t for t in timer.times]


def step_matmuls(n_layer: int, n_embd: int, vocab: int, tokens: int) -> list[tuple[int, int, int, int]]:
    """(m, k, n, count) of every matrix product in one training step of a GPT-2: for each linear
    y = x W^T (tokens x d_in -> d_out) the forward, the input gradient and the weight gradient."""
    linears = [(n_embd, 3 * n_embd, n_layer), (n_embd, n_embd, n_layer), (n_embd, 4 * n_embd, n_layer),
               (4 * n_embd, n_embd, n_layer), (n_embd, vocab, 1)]
    out = []
    for d_in, d_out, count in linears:
        out += [(tokens, d_in, d_out, count), (tokens, d_out, d_in, count), (d_out, tokens, d_in, count)]
    return out


def run_peak(cfg: dict) -> dict:
    """FLOP/s of this machine on the step's own matrix products, in the config's dtype (best of 5 each):
    the best single shape ("peak") and the whole step's mix (total FLOPs / total time)."""
    from gpt2ft.config import preset

    device, dtype = device_and_dtype(cfg)
    c = preset("gpt2")
    flops = seconds = 0.0
    best = 0.0
    for m, k, n, count in step_matmuls(c.n_layer, c.n_embd, c.vocab_size, cfg["batch"] * cfg["length"]):
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        out = a @ b  # warm up (and allocate the output once)
        times = []
        for _ in range(5):
            sync()
            start = clock()
            torch.mm(a, b, out=out)
            sync()
            times.append(clock() - start)
        t = min(times)
        best = max(best, 2 * m * k * n / t)
        flops, seconds = flops + 2 * m * k * n * count, seconds + t * count
    return {"rate": best, "mix": flops / seconds, "dtype": str(dtype).removeprefix("torch.")}


RUNNERS = {"ours": run_ours, "ours_lora": run_ours, "hf_loop": run_hf_loop, "hf_peft": run_hf_loop,
           "hf_trainer": run_hf_trainer, "ours_sft": run_ours_sft, "trl_sft": run_trl_sft, "peak": run_peak}


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    torch.set_num_threads(config.get("threads") or torch.get_num_threads())
    clock = time.process_time if config.get("clock") == "cpu" else time.perf_counter
    rates = RUNNERS[config["kind"]](config)
    if isinstance(rates, dict):  # peak: its own record
        print(json.dumps(rates))
    else:
        print(json.dumps({"rate": statistics.median(rates[1:] if len(rates) > 1 else rates), "rates": rates,
                          "peak_mb": peak_memory_mb(), "dtype": dtype_name(config)}))
