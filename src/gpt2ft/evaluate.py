"""Evaluation: generate a response per example and score it (exact match, BLEU, ROUGE-1/2/L, length
ratio, keywords), the perplexity of the reference responses, and plain-text perplexity."""
from __future__ import annotations

from dataclasses import replace


import torch

from .data import to_device
from .errors import UserError
from .data.instructions import Record
from .data.sft import InstructionDataset, fit_to_length, prompt_ids, tokenize_messages
from .generation import SamplingConfig, fits_context, generate_batch
from .losses import masked_lm_loss_sum, perplexity


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


def score_one(output: str, reference: str, keywords: list[str], rouge) -> dict:
    import sacrebleu

    r = rouge.score(reference, output)
    out_words, ref_words = len(output.split()), max(len(reference.split()), 1)
    return {
        "exact_match": float(normalize_answer(output) == normalize_answer(reference)),
        "bleu": sacrebleu.sentence_bleu(output, [reference]).score,
        "rouge1": r["rouge1"].fmeasure, "rouge2": r["rouge2"].fmeasure, "rougeL": r["rougeL"].fmeasure,
        "length_ratio": out_words / ref_words,
        **({"keyword_present": float(all(k.lower() in output.lower() for k in keywords))} if keywords else {}),
    }


def score(outputs: list[str], references: list[str], keywords: list[str] | None = None) -> tuple[list[dict], dict]:
    """Per-example scores and the summary: corpus BLEU (sacrebleu), mean ROUGE F1 (rouge-score, stemmed),
    exact match rate, corpus length ratio, keyword rate."""
    import sacrebleu
    from rouge_score import rouge_scorer

    keywords = keywords or []
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows = [score_one(o, r, keywords, rouge) for o, r in zip(outputs, references)]
    n = max(len(rows), 1)
    summary = {
        "examples": len(rows),
        "exact_match": sum(r["exact_match"] for r in rows) / n,
        "bleu": sacrebleu.corpus_bleu(outputs, [references]).score if rows else 0.0,
        "rouge1": sum(r["rouge1"] for r in rows) / n,
        "rouge2": sum(r["rouge2"] for r in rows) / n,
        "rougeL": sum(r["rougeL"] for r in rows) / n,
        "length_ratio": sum(len(o.split()) for o in outputs) / max(sum(len(r.split()) for r in references), 1),
    }
    if keywords:
        summary["keyword_rate"] = sum(r["keyword_present"] for r in rows) / n
    return rows, summary


@torch.no_grad()
def reference_perplexity(model, tokenizer, records: list[Record], template, batch_size: int = 8) -> float:
    """exp(mean NLL of the reference response tokens, EOS included, given their prompts)."""
    examples = []
    for r in records:
        ex, _ = fit_to_length(tokenize_messages(r.messages, template, tokenizer), model.config.block_size)
        if ex is not None:
            examples.append(ex)
    data = InstructionDataset(examples, tokenizer.eos_id)
    device = model.lm_head.weight.device
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = data.batch(range(start, min(start + batch_size, len(data))))
        batch = to_device(batch, device)
        loss, n = masked_lm_loss_sum(model, batch)
        total, count = total + float(loss), count + n
    return perplexity(total / max(count, 1))


def evaluate_records(model, tokenizer, records: list[Record], template, sampling: SamplingConfig,
                     keywords: list[str] | None = None, batch_size: int = 8, shrink: bool = False,
                     flag: str = "--max-new-tokens", progress: str | None = None) -> tuple[list[dict], dict]:
    """Generate for every record (batched) and score against its reference response. A prompt that leaves
    no room for sampling.max_new_tokens is skipped; with `shrink` (evaluations during training) it gets
    what its own context leaves instead, and only a prompt that fills the context is skipped. No record
    left is an error naming `flag` (a report of nothing would read as scores)."""
    was_training = model.training
    model.eval()
    prompts = [template.prompt(r.messages[:-1]) for r in records]  # all but the final reply
    ids = [prompt_ids(r.messages[:-1], template, tokenizer) for r in records]  # exactly as SFT tokenised them
    context, wanted = model.config.block_size, sampling.max_new_tokens
    kept = [i for i, p in enumerate(ids) if fits_context(p, 1 if shrink else wanted, context)]
    if records and not kept:
        raise UserError(f"no record can be scored: none of the {len(records)} prompts leaves room for "
                        f"{flag} {1 if shrink else wanted} in the model's context of {context} tokens"
                        f"{'' if shrink else f'; lower {flag}'}")
    configs = [replace(sampling, max_new_tokens=min(wanted, context - max(len(ids[i]), 1))) for i in kept]
    outputs = generate_batch(model, tokenizer, [ids[i] for i in kept], configs, batch_size, progress)
    references = [records[i].response for i in kept]
    per_example, summary = score(outputs, references, keywords)
    summary["skipped_too_long"] = len(records) - len(kept)
    summary["reference_ppl"] = reference_perplexity(model, tokenizer, [records[i] for i in kept], template, batch_size)
    rows = [{"where": records[i].where, "prompt": prompts[i], "reference": ref, "output": out, **s}
            for i, ref, out, s in zip(kept, references, outputs, per_example)]
    model.train(was_training)
    return rows, summary


@torch.no_grad()
def text_perplexity(model, tokenizer, text: str, stride: int | None = None) -> tuple[float, int]:
    """Perplexity of a text in non-overlapping context-length windows; returns (ppl, tokens scored)."""
    ids = tokenizer.encode(text)
    T = stride or model.config.block_size
    device = model.lm_head.weight.device
    total, count = 0.0, 0
    for start in range(0, max(len(ids) - 1, 0), T):
        chunk = torch.tensor([ids[start:start + T + 1]], device=device)
        if chunk.shape[1] < 2:
            break
        loss, n = masked_lm_loss_sum(model, {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]})
        total, count = total + float(loss), count + n
    return perplexity(total / max(count, 1)), count
