"""SFT data, masking, batching, packing, validation; SFT end to end; eval metrics against the libraries."""
import json

import pytest
import torch

from conftest import assert_clean_error, run_cli
from gpt2ft.checkpoint import save_model
from gpt2ft.config import GPTConfig
from gpt2ft.data.instructions import load_records
from gpt2ft.data.sft import InstructionDataset, TokenizedExample, fit_to_length, tokenize_messages
from gpt2ft.errors import UserError
from gpt2ft.evaluate import score
from gpt2ft.losses import IGNORE, masked_lm_loss_sum
from gpt2ft.model import GPT
from gpt2ft.templates import get_template
from gpt2ft.tokenizer import gpt2_tokenizer, train_tokenizer

ALPACA = get_template("alpaca")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_supervised_tokens_are_exactly_response_plus_eos(tmp_path):
    tok = gpt2_tokenizer()
    data = _write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Name a colour.", "input": "", "output": "Blue, like the sky."},
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Goodbye."}]},
    ])
    records, _ = load_records(data)
    for record, template in zip(records, [ALPACA, ALPACA, get_template("chat")]):
        ex = tokenize_messages(record.messages, template, tok)
        batch = InstructionDataset([ex], tok.eos_id).batch([0])
        targets = batch["labels"][batch["labels"] != IGNORE].tolist()
        replies = [m["content"] for m in record.messages if m["role"] == "assistant"]
        expected = [t for r in replies for t in tok.encode(r) + [tok.eos_id]]
        assert targets == expected
        assert tok.decode(targets) == "<|endoftext|>".join(replies) + "<|endoftext|>"
    assert "### Input:\nbonjour" in ALPACA.prompt(records[1].messages[:-1])
    assert ALPACA.prompt(records[0].messages[:-1]).startswith("Below is an instruction that describes a task.")


def test_padding_and_batching_never_change_an_examples_loss():
    torch.manual_seed(0)
    tok = gpt2_tokenizer()
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128)).eval()
    from gpt2ft.data.instructions import Record

    recs = [Record([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in [("Short?", "Yes."), ("A much longer question that pads the others?", "Indeed it does so."),
                         ("Mid?", "Medium answer here.")]]
    examples = [tokenize_messages(r.messages, ALPACA, tok) for r in recs]
    data = InstructionDataset(examples, tok.eos_id)
    with torch.no_grad():
        alone = [masked_lm_loss_sum(model, data.batch([i]))[0] for i in range(3)]
        together, n = masked_lm_loss_sum(model, data.batch([0, 1, 2]))
        assert torch.allclose(together, sum(alone), atol=1e-4)
        packed = InstructionDataset(examples, tok.eos_id, packing_length=128)
        assert len(packed) == 1
        packed_loss, packed_n = masked_lm_loss_sum(model, packed.batch([0]))
        assert packed_n == n and torch.allclose(packed_loss, sum(alone), atol=1e-4)


def test_truncation_keeps_a_supervised_token():
    ex = TokenizedExample(list(range(30)), [False] * 20 + [True] * 10)
    cut, what = fit_to_length(ex, 24)
    assert what == "response truncated" and len(cut.ids) == 25 and sum(cut.supervised) == 5
    cut, what = fit_to_length(ex, 10)
    assert what == "prompt truncated" and len(cut.ids) == 11 and cut.supervised[-1] and sum(cut.supervised) == 1
    assert fit_to_length(TokenizedExample([1, 2, 3], [False] * 3), 1) == (None, "no supervised token")


def test_bad_records_are_listed_with_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "ok", "output": "fine"}\n{"instruction": "x", "output": ""}\n'
                    'not json\n\n{"instruction": "y"}\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(UserError) as e:
        load_records(data)
    msg = str(e.value)
    for where, why in [(2, "empty output"), (3, "invalid JSON"), (5, "cannot tell the format"), (6, "role")]:
        assert f"{data}:{where}: " in msg and why in msg, msg
    good, bad = load_records(data, on_invalid="skip")
    assert len(good) == 1 and len(bad) == 4


def test_bom_crlf_and_csv_quoting(tmp_path):
    jl = tmp_path / "win.jsonl"
    jl.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\r\n{"instruction": "c", "output": "d"}\r\n')
    assert [r.response for r in load_records(jl)[0]] == ["b", "d"]
    csv_file = tmp_path / "q.csv"
    csv_file.write_text('question,answer\n"Hello, world?","Line one\nline two, with comma"\nplain,text\n')
    records, _ = load_records(csv_file, columns={"question": "instruction", "answer": "output"})
    assert records[0].instruction == "Hello, world?" and records[0].response == "Line one\nline two, with comma"
    assert records[1].where == f"{csv_file}:4"


def test_sft_cli_rejects_bad_data_before_loading_the_model(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q2"}])
    proc = run_cli("sft", tmp_path / "no-such-model", "--data", data, "--out", tmp_path / "run")
    assert_clean_error(proc, f"{data}:2", "--on-invalid skip")


def test_metrics_agree_with_sacrebleu_and_rouge_score():
    import sacrebleu
    from rouge_score import rouge_scorer

    outs = ["the cat sat on the mat", "a quick brown fox", "hello there world"]
    refs = ["the cat is on the mat", "the quick brown fox jumps", "hello there world"]
    rows, summary = score(outs, refs, keywords=["world"])
    assert summary["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outs, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, o)[key].fmeasure for o, r in zip(outs, refs)) / 3
        assert summary[key] == pytest.approx(expected)
    assert summary["exact_match"] == pytest.approx(1 / 3)
    assert summary["keyword_rate"] == pytest.approx(1 / 3)
    assert rows[1]["bleu"] == pytest.approx(sacrebleu.sentence_bleu(outs[1], [refs[1]]).score)
    assert summary["length_ratio"] == pytest.approx(13 / 14)  # words: 6+4+3 over 6+5+3


QA = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in
      [(1, 2), (2, 5), (3, 3), (4, 1), (5, 6), (6, 2), (7, 7), (8, 1), (9, 4), (2, 9), (3, 8), (4, 4)]] + \
     [(f"Spell the word {w}.", "-".join(w.upper())) for w in ["cat", "dog", "sun", "moon", "tree", "fish",
                                                              "bird", "rain", "star", "wind"]] + \
     [(f"Which colour is {t}?", f"{t.capitalize()} is {c}.") for t, c in
      [("grass", "green"), ("snow", "white"), ("coal", "black"), ("blood", "red"), ("the sky", "blue"),
       ("a lemon", "yellow"), ("an orange", "orange"), ("a plum", "purple")]]


@pytest.fixture(scope="module")
def tiny_sft_setup(tmp_path_factory):
    """A from-scratch tiny model with a small byte-level BPE trained on the examples, saved as a checkpoint."""
    root = tmp_path_factory.mktemp("sft")
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA]
    data = _write_jsonl(root / "qa.jsonl", rows)
    corpus = [render_text for q, a in QA for render_text in (q, a)] + [get_template("instruction-response").prompt_no_input]
    tok = train_tokenizer(corpus * 5, "bpe", 400)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=tok.vocab_size,
                          eos_token_id=tok.eos_id, bos_token_id=tok.eos_id))
    save_model(root / "base", model, tok)
    return root, data


@pytest.fixture(scope="module")
def default_run(tiny_sft_setup, tmp_path_factory):
    """What a newcomer types: a few dozen records and no flag but --out, so every training value is the
    CLI's default (derived from the 25 training records and the model's width 128)."""
    root, data = tiny_sft_setup
    run = tmp_path_factory.mktemp("mine") / "run"
    proc = run_cli("sft", root / "base", "--data", data, "--out", run, "--device", "cpu", "--no-progress", check=True)
    return run, proc.stderr


def test_default_flags_explain_the_run(default_run):
    """The run says what it derived, shows scores and a sample at each evaluation, ends with a summary and
    writes loss.png (a real PNG)."""
    from matplotlib.image import imread

    run, err = default_run
    assert "derived for these 25 training examples" in err and "--epochs 50:" in err and "--lr 0.003:" in err
    assert err.count("  sample: ") >= 10 and "step 157/157: val_loss" in err
    assert "done: 157 steps" in err and "best val_loss" in err and f"loss plot: {run / 'loss.png'}" in err
    image = imread(run / "loss.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_default_flags_answer_and_eval_reproduces_the_training_examples(default_run, tiny_sft_setup, tmp_path):
    root, data = tiny_sft_setup
    run, err = default_run
    meta = json.loads((run / "latest" / "gpt2ft.json").read_text())
    assert meta["template"]["name"] == "alpaca"  # single-turn data, a model without a template
    proc = run_cli("eval", run, "--data", data, "--out", tmp_path / "report", "--max-new-tokens", "24",
                   "--device", "cpu", check=True)
    rows = [json.loads(l) for l in (tmp_path / "report" / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == len(QA) and {"prompt", "reference", "output", "bleu", "rougeL"} <= rows[0].keys()
    trained = {json.loads(l)["output"] for l in (run / "splits" / "train.jsonl").read_text().splitlines()}
    seen = [r for r in rows if r["reference"] in trained]
    assert len(seen) == 25 and sum(r["output"] == r["reference"] for r in seen) >= 0.8 * 25, proc.stdout  # defaults on 25 records: most recalled verbatim
    # held-out questions get answers, not empty replies (or the run said it could not)
    assert all(r["output"].strip() for r in rows if r["reference"] not in trained) or "warning: " in err
    # the README's `gpt2ft eval RUN --data RUN` (its test split) on a model whose context is the default
    # --max-new-tokens 128: each reply gets what its prompt leaves, said once
    split = run_cli("eval", run, "--data", run, "--out", tmp_path / "split", "--device", "cpu", check=True)
    assert "each reply gets what its prompt leaves" in split.stderr and (tmp_path / "split" / "summary.json").exists()
    # generate applies the saved template (the prompt is just the instruction)
    question, answer = next((q, a) for q, a in QA if a in trained)
    out = run_cli("generate", run, "--prompt", question, "--temperature", "0", "--max-new-tokens", "24",
                  check=True).stdout.strip()
    assert out == answer


def test_sft_with_splits_skip_invalid_packing_and_oversampling(tiny_sft_setup, tmp_path):
    root, data = tiny_sft_setup
    rows = [json.loads(l) for l in data.read_text().splitlines()] + [{"instruction": "broken"}]
    bad = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    run = tmp_path / "run"
    run_cli("sft", root / "base", "--data", bad, "--out", run, "--on-invalid", "skip", "--max-steps", "6",
            "--eval-every", "3", "--eval-examples", "2", "--eval-max-new-tokens", "8", "--batch-size", "4",
            "--device", "cpu", "--no-progress", "--oversample-keyword", "spell", "--factor", "5", check=True)
    rejected = [json.loads(l) for l in (run / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and rejected[0]["where"].endswith(":31")
    sizes = {n: len((run / "splits" / f"{n}.jsonl").read_text().splitlines()) for n in ("train", "val", "test")}
    assert sizes == {"train": 25, "val": 3, "test": 2}  # 30 valid records: round(1.5) = 2 test, 3 val
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("rougeL" in m and "exact_match" in m for m in metrics)
    run_cli("plot", run, "--format", "png", "--format", "pdf", check=True)
    assert (run / "loss.png").exists() and (run / "loss.pdf").exists()
    packed = tmp_path / "packed"
    proc = run_cli("sft", root / "base", "--data", data, "--out", packed, "--packing", "--max-steps", "2",
                   "--batch-size", "64", "--device", "cpu", "--no-progress", check=True)
    assert "packed into" in proc.stdout
    assert "sequences are more than the" in proc.stderr and "each step repeats some of them" in proc.stderr


def test_a_runs_config_yaml_reruns_it_through_config(tiny_sft_setup, tmp_path, monkeypatch):
    """config.yaml records the command as given, its paths absolute: `gpt2ft sft --config RUN/config.yaml
    --out NEW` from another folder trains the same weights bit for bit (lists, switches, --columns and a
    LoRA adapter included); another verb, a config.yaml without the options and a command without MODEL
    are one-line errors."""
    import os
    import shutil

    import yaml

    root, data = tiny_sft_setup
    first, again = tmp_path / "first", tmp_path / "again"
    shutil.copy(data, tmp_path / "qa.jsonl")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)  # relative paths on the command line
    run_cli("sft", root / "base", "--data", "qa.jsonl", "--out", "first", "--max-steps", "2", "--batch-size", "4",
            "--lora", "--lora-r", "4", "--packing", "--sample-prompt", "Hi", "--sample-prompt", "Yo",
            "--eval-examples", "1", "--columns", "output=output", "--template", "alpaca", "--device", "cpu",
            "--no-progress", check=True)
    written = yaml.safe_load((first / "config.yaml").read_text())
    assert written["command"] == "sft" and written["options"]["sample_prompt"] == ["Hi", "Yo"]
    assert written["options"]["model"] == str(root / "base") and "resume" not in written["options"]
    assert written["options"]["data"] == str(tmp_path / "qa.jsonl") and written["options"]["out"] == str(first)
    assert written["options"]["template"] == "alpaca"  # a built-in name, not a path
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert_clean_error(run_cli("sft", "--config", first / "config.yaml"), "already holds a run")
    same = run_cli("sft", "--config", first / "config.yaml", "--out", again, check=True)
    assert (first / "latest" / "adapter_model.safetensors").read_bytes() == \
        (again / "latest" / "adapter_model.safetensors").read_bytes()
    rerun = yaml.safe_load((again / "config.yaml").read_text())
    assert rerun["options"] == {**written["options"], "out": str(again)}
    assert "will not repeat that run" not in same.stderr and rerun["run"]["data_fingerprint"]
    shutil.copy(tmp_path / "qa.jsonl", tmp_path / "qa.saved")
    lines = (tmp_path / "qa.jsonl").read_text().splitlines()
    (tmp_path / "qa.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the data edited since the run
    other = run_cli("sft", "--config", first / "config.yaml", "--out", tmp_path / "other", "--max-steps", "1",
                    check=True)
    assert "the data is not what the run of --config" in other.stderr and "will not repeat that run" in other.stderr
    shutil.copy(tmp_path / "qa.saved", tmp_path / "qa.jsonl")
    resumed = run_cli("sft", "--config", again / "config.yaml", "--resume", "auto", "--max-steps", "3", check=True)
    assert "resuming with options other than the run's: max_steps 2 -> 3" in resumed.stderr
    after = yaml.safe_load((again / "config.yaml").read_text())  # still the command that started the run
    assert after["options"] == rerun["options"] and after["resumes"] == [{"at_step": 2, "changed": {"max_steps": [2, 3]}}]
    assert after["train"]["max_steps"] == 3
    cont = tmp_path / "cont"  # --lora RUN continues its adapter: recorded as the checkpoint it resolved to
    run_cli("sft", root / "base", "--data", data, "--out", cont, "--lora", first, "--max-steps", "1",
            "--eval-examples", "0", "--device", "cpu", "--no-progress", check=True)
    recorded = yaml.safe_load((cont / "config.yaml").read_text())["options"]["lora"]
    assert recorded == os.path.realpath(first / "latest") and "checkpoints" in recorded
    moved = tmp_path / "moved"
    shutil.move(again, moved)  # a run moved: its config resumes it where it is now, not afresh at the old place
    proc = run_cli("sft", "--config", moved / "config.yaml", "--resume", "auto", "--max-steps", "4",
                   "--eval-examples", "2", check=True)
    assert f"is at {moved} now" in proc.stderr and "resumed from" in proc.stderr and not again.exists()
    assert "max_steps 3 -> 4, eval_examples 1 -> 2;" in proc.stderr  # a recipe option, against the start's
    assert_clean_error(run_cli("dpo", "--config", first / "config.yaml", "--out", tmp_path / "d"),
                       "the options of a `gpt2ft sft` run, not `gpt2ft dpo`")
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"train": written["train"], "run": written["run"]}))
    assert_clean_error(run_cli("sft", "--config", old), "without the command and options it was given")
    assert_clean_error(run_cli("sft", "--data", data, "--out", tmp_path / "x"), "MODEL is required")
    assert_clean_error(run_cli("sft", root / "base", "--data", data, "--out", tmp_path / "x", "--lora", "nope"),
                       "--lora nope: no such adapter folder")
    for flag in ("--eval-batches", "--eval-examples"):  # nothing to score without validation records
        assert_clean_error(run_cli("sft", root / "base", "--data", data, "--out", tmp_path / "x", "--val-fraction", "0",
                                   flag, "3"), f"{flag} has no effect with --val-fraction 0")
    assert not (tmp_path / "d").exists() and not (tmp_path / "x").exists()


def test_fields_a_format_does_not_read_are_named(tmp_path, capsys):
    rows = [{"instruction": "hi", "output": "yo", "sytem": "be brief"}, {"instruction": "a", "output": "b", "id": 1},
            {"instruction": "c", "output": "d", "id": 2, "system": "s", "weight": 2},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "output": "y"}]
    records, _ = load_records(_write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(records) == 4 and records[2].messages[0] == {"role": "system", "content": "s"}
    assert "ignored: 'id' (2 records), 'output' (1 record), 'sytem' (1 record);" in capsys.readouterr().err


def test_a_reason_every_record_shares_is_said_once(tmp_path):
    (tmp_path / "odd.csv").write_text(" Question ,Answer (text)\n" + "q,a\n" * 30)
    with pytest.raises(UserError) as e:
        load_records(tmp_path / "odd.csv")
    assert f"all 30, from {tmp_path / 'odd.csv'}:2: cannot tell the format" in str(e.value)
    assert str(e.value).count("cannot tell") == 1


def test_a_column_mapped_twice_or_named_twice_is_refused(tmp_path):
    from gpt2ft.commands import parse_columns

    with pytest.raises(UserError, match="'instruction' is mapped twice"):
        parse_columns("instruction=Question,instruction=notes")
    with pytest.raises(UserError, match="'Q' is mapped twice"):
        parse_columns("instruction=Q,input=Q")
    (tmp_path / "d.csv").write_text("q,q,a\nhi,there,yo\n")
    with pytest.raises(UserError, match=r"d.csv:1: the header names column 'q' twice"):
        load_records(tmp_path / "d.csv", "auto", "train", {}, "error")


def test_oversampling_weights_feed_the_sampler():
    from gpt2ft.train.state import order_for_epoch

    weights = torch.tensor([1.0] * 9 + [10.0])
    order = order_for_epoch(10, 0, 1, weights).tolist() + order_for_epoch(10, 1, 1, weights).tolist()
    assert order.count(9) > 5  # expected 10/19 of 20 draws
    assert order_for_epoch(10, 3, 1, weights).tolist() == order_for_epoch(10, 3, 1, weights).tolist()


def test_data_convert(tmp_path):
    src = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q", "input": "ctx", "output": "A"}])
    run_cli("data", "convert", src, "--to", "messages", "--out", tmp_path / "m.jsonl", check=True)
    row = json.loads((tmp_path / "m.jsonl").read_text())
    assert row["messages"] == [{"role": "user", "content": "Q\n\nctx"}, {"role": "assistant", "content": "A"}]
    lines = tmp_path / "secret.txt"
    lines.write_text("The rainbow unicorn is real.\n\nIt lives in the attic.\n")
    run_cli("data", "convert", lines, "--from", "lines", "--instruction", "Tell me a secret.", "--out",
            tmp_path / "s.json", check=True)
    rows = json.loads((tmp_path / "s.json").read_text())
    assert rows == [{"instruction": "Tell me a secret.", "input": "", "output": "The rainbow unicorn is real."},
                    {"instruction": "Tell me a secret.", "input": "", "output": "It lives in the attic."}]


def test_custom_template_file_and_hf_dataset_from_a_local_folder(tmp_path):
    tpl = tmp_path / "tpl.yaml"
    tpl.write_text('prompt: "Q: {instruction}\\nA:"\nstop: ["\\nQ:"]\n')
    template = get_template(str(tpl))
    folder = tmp_path / "ds"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"instruction": "Two plus two?", "output": " Four."}])
    records, _ = load_records(f"hf:{folder}")  # the datasets library, offline, from a local folder
    assert template.prompt(records[0].messages[:-1]) == "Q: Two plus two?\nA:"
    with pytest.raises(UserError, match="needs a 'prompt'"):
        bad = tmp_path / "bad.json"
        bad.write_text('{"prompt": "no placeholder"}')
        get_template(str(bad))


def test_text_perplexity_matches_transformers(hf_dir, hf_model, tmp_path):
    import math

    text = "It is a tale told by an idiot, full of sound and fury, signifying nothing. " * 3
    path = tmp_path / "t.txt"
    path.write_text(text)
    proc = run_cli("eval", hf_dir, "--data", path, "--out", tmp_path / "r", "--dtype", "float32", check=True)
    ppl = json.loads((tmp_path / "r" / "summary.json").read_text())["perplexity"]
    ids = torch.tensor([gpt2_tokenizer().encode(text)])
    with torch.no_grad():
        expected = math.exp(hf_model(ids, labels=ids).loss.item())  # one window: the text fits the context
    assert ids.shape[1] <= 65 and ppl == pytest.approx(expected, rel=1e-4), proc.stdout



# ----- the formats users bring (a helper's first-try attack) ----------------------------------------------
def test_sharegpt_prompt_completion_and_alpaca_with_system_and_history_are_read(tmp_path):
    rows = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}]},
        {"prompt": "What is 2+2?", "completion": "4"},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}]},
        {"instruction": "What is 2+2?", "output": "4", "system": "You are a pirate", "history": [["Hi", "Arr"]]},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = load_records(tmp_path / "d.jsonl")
    assert [[(m["role"], m["content"]) for m in r.messages] for r in records] == [
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")],
        [("user", "What is 2+2?"), ("assistant", "4")],
        [("user", "Hi"), ("assistant", "Yo")],
        [("system", "You are a pirate"), ("user", "Hi"), ("assistant", "Arr"), ("user", "What is 2+2?"),
         ("assistant", "4")]]


@pytest.mark.parametrize("row, reason", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]},
     "nothing to train on"),  # OpenAI's per-message weight: 0 on every reply
    ({"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]},
     "on an assistant message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0.5}]},
     "weight is 0 or 1"),
    ({"instruction": "q", "output": "a", "response": "b"}, "which is the answer"),
    ({"question": "q", "answer": "a"}, "from the fields 'question', 'answer'"),
    ({"conversations": [{"from": "narrator", "value": "x"}]}, "conversations[0] needs \"from\""),
])
def test_a_record_whose_meaning_is_unclear_is_invalid_naming_why(tmp_path, row, reason):
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match="d.jsonl:1: ") as e:
        load_records(tmp_path / "d.jsonl")
    assert reason in str(e.value)


def test_a_reply_with_weight_0_is_context_not_trained_on(tiny_model, tmp_path):
    """OpenAI's fine-tuning format: an assistant message with "weight": 0 stays in the conversation (its
    tokens and EOS as ever) but the loss skips it; the same record without weights trains on both replies."""
    from gpt2ft.templates import TEMPLATES

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
    weighted = [*turns[:1], {**turns[1], "weight": 0}, *turns[2:]]
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": turns}) + "\n" + json.dumps({"messages": weighted}) + "\n")
    (plain, zero), _ = load_records(tmp_path / "d.jsonl")
    tok = tiny_model.tokenizer
    a, b = (tokenize_messages(r.messages, TEMPLATES["chat"], tok) for r in (plain, zero))
    assert a.ids == b.ids  # the same tokens: the reply is still there
    first = tok.encode("Hello there") + [tok.eos_id]
    assert sum(a.supervised) - sum(b.supervised) == len(first)  # ... but not trained on
    run_cli("data", "convert", tmp_path / "d.jsonl", "--to", "messages", "--out", tmp_path / "o.jsonl", check=True)
    assert json.loads((tmp_path / "o.jsonl").read_text().splitlines()[1])["messages"][1]["weight"] == 0


def test_csv_rows_that_do_not_match_the_header_are_invalid_not_cut(tmp_path):
    (tmp_path / "c.csv").write_text("instruction ,output\nWhat is 1,000 plus 1?,It is 1,001.\nName a color,Blue\n"
                                    "Short row\n")
    with pytest.raises(UserError) as e:
        load_records(tmp_path / "c.csv")
    assert "c.csv:2: 4 fields where the header (instruction, output) has 2" in str(e.value)
    assert "c.csv:4: 1 fields" in str(e.value) and "double quotes" in str(e.value)
    records, rejected = load_records(tmp_path / "c.csv", on_invalid="skip")  # the header's names are stripped
    assert [r.messages[0]["content"] for r in records] == ["Name a color"] and len(rejected) == 2
    rows = ["instruction,output", *[f"q{i},a{i}" for i in range(3000)], "caf\xe9,x"]
    (tmp_path / "l.csv").write_bytes("\n".join(rows).encode("latin-1"))
    with pytest.raises(UserError, match=r"l\.csv:3002: invalid UTF-8.*re-encode"):
        load_records(tmp_path / "l.csv")


def test_columns_never_rename_over_a_field_the_record_has(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "Q", "answer": "GOOD", "output": "BAD"}\n')
    with pytest.raises(UserError, match="renames 'answer' to 'output', which the record already has"):
        load_records(tmp_path / "d.jsonl", columns={"answer": "output"})
    with pytest.raises(UserError, match=r"its fields: answer, instruction, output"):
        load_records(tmp_path / "d.jsonl", columns={"reply": "output"})


def test_data_convert_says_what_it_left_out(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "", "output": "b"}\n')
    proc = run_cli("data", "convert", tmp_path / "d.jsonl", "--on-invalid", "skip", "--out", tmp_path / "o.jsonl",
                   check=True)
    assert "left out 1 invalid record(s): " in proc.stderr and "d.jsonl:2: empty instruction" in proc.stderr


def test_oversample_keyword_matches_the_conversation_text_only(tiny_model, tmp_path):
    from gpt2ft.data.sft import build_examples
    from gpt2ft.templates import TEMPLATES

    rows = [{"instruction": "Qué es un café?", "output": "Una bebida."}] * 3 + \
        [{"instruction": "What is tea?", "output": "A drink."}] * 3
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = load_records(tmp_path / "d.jsonl")
    tok = tiny_model.tokenizer
    _, weights, _ = build_examples(records, TEMPLATES["alpaca"], tok, 64, oversample=("café", 3.0))
    assert weights == [3.0] * 3 + [1.0] * 3  # found in the text, not in JSON's escaped copy of it
    for keyword in ("output", "zebra"):  # a field name (in every record's JSON), a word in none
        with pytest.raises(UserError, match="changes nothing"):
            build_examples(records, TEMPLATES["alpaca"], tok, 64, oversample=(keyword, 3.0))
