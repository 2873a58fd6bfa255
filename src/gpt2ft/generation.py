"""Text generation: the Engine (completions join and leave a running batch, each in its own KV-cache
slot) and the thin wrappers over it: generate(), stream(), generate_batch(), complete_batch() and
Session (one conversation's cache kept between chat turns). One completion's decoding, stops and
sampling are in completion.py; its names are re-exported here."""
from __future__ import annotations

import functools
import sys
import time
from collections import deque

import torch

from .completion import (Completion, TextDecoder, TokenLogprob, apply_presence_frequency_penalty,
                         apply_repetition_penalty, next_tokens, sample_next, top_k_filter, top_p_filter)
from .errors import OptionError, UserError
from .grammar import RowMasks, compile_grammar
from .model import GPT, KVCache
from .runtime import check_compiler, one_row_rounds_as_several, progress_bar
from .sampling import SamplingConfig
from .tokenizer import Tokenizer

__all__ = ["SamplingConfig", "Completion", "TextDecoder", "TokenLogprob", "apply_presence_frequency_penalty",
           "apply_repetition_penalty", "sample_next", "top_k_filter", "top_p_filter", "check_context", "fits_context",
           "Engine", "Stream", "stream", "complete_batch", "generate_batch", "generate", "Session",
           "predict_next_token"]


def check_context(prompt_len: int, max_new_tokens: int, context: int) -> None:
    prompt_len = max(prompt_len, 1)  # an empty prompt starts from <|endoftext|> (Engine.add)
    if prompt_len >= context:
        raise UserError(f"the prompt is {prompt_len} tokens but the model's context is {context}: shorten the prompt")
    if prompt_len + max_new_tokens > context:
        raise UserError(f"the prompt is {prompt_len} tokens and max_new_tokens is {max_new_tokens}: "
                        f"{prompt_len + max_new_tokens} positions exceed the model's context of {context}; "
                        f"lower max_new_tokens to {context - prompt_len} or shorten the prompt")


def fits_context(prompt_ids: list[int], max_new_tokens: int, context: int) -> bool:
    """Whether a prompt leaves room for max_new_tokens in the context (the filter of batch jobs that
    skip, rather than fail on, prompts that are too long). An empty prompt is one <|endoftext|>."""
    return max(len(prompt_ids), 1) <= context - max_new_tokens


# ----- the engine: a running batch that rows join and leave ---------------------------------------
def _decode(model: GPT, tokens, input_pos, kv_caches, cache_rows, static: bool, rows_apart: bool = False):
    return model(tokens, input_pos=input_pos, kv_caches=kv_caches, cache_rows=cache_rows, static_cache=static,
                 logits_at="last", rows_apart=rows_apart)


class _CacheView:
    """One layer's cache as two plain tensors: torch.compile sees them as inputs whose length may vary (an
    nn.Module's buffers it holds static), so one compiled step serves every cache length."""

    update = KVCache.update

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v


def _decode_static(model: GPT, tokens, input_pos, keys: list[torch.Tensor], values: list[torch.Tensor]):
    """Each row's newest token over every slot of the cache given (the mask hides the slots past a row's
    position): shapes that torch.compile can hold fixed but for the ones marked dynamic."""
    caches = [_CacheView(k, v) for k, v in zip(keys, values)]
    return model(tokens, input_pos=input_pos, kv_caches=caches, static_cache=True, logits_at="last")


_COMPILED: dict[str, object] = {}  # device type -> torch.compile(_decode_static); guards tell models apart
_WARM: set[int] = set()  # the models whose compiled step ran in this process


def compiled_decode(device: torch.device):
    """The decode step under torch.compile, made once per process: inductor's C++ kernels on a CPU, CUDA
    graphs on a GPU. Row count and cache length are dynamic (see Engine._compiled_step): no recompiling."""
    if device.type not in _COMPILED:
        check_compiler(device)
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.decomposition import select_decomp_table
        from torch._inductor.lowering import lowerings, make_fallback

        # Greedy tokens must be eager's: rounding after each bf16/fp16 op as eager does, and layer norm as
        # eager's kernel (inductor's own sums in another order: 1 in ~30,000 bf16 outputs differed).
        options = {"emulate_precision_casts": True, **({"triton.cudagraphs": True} if device.type == "cuda" else {})}
        layer_norm = torch.ops.aten.native_layer_norm.default
        table = {op: f for op, f in select_decomp_table().items() if op != layer_norm}
        if layer_norm not in lowerings:  # declared, not implicit: inductor refuses an implicit one under CI=1
            make_fallback(layer_norm, warn=False, override_decomp=True)
        _COMPILED[device.type] = torch.compile(
            _decode_static, backend=lambda gm, inputs: compile_fx(gm, inputs, config_patches=options,
                                                                  decompositions=table))
    return _COMPILED[device.type]


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _seeded(rows: list[tuple[int, Completion]]) -> bool:
    """Whether these rows must decode exactly as each would alone (a seed promises the same tokens in any
    batch; in bf16 matmuls round with the row count, SDPA with the key count): such steps prefill one
    prompt a forward, multiply at least two rows, and attend row by row."""
    return any(c.sampling.seed is not None for _, c in rows)


def _apart(rows: list[tuple[int, Completion]]) -> bool:
    """Whether a step attends as each row alone does (see model._attend_rows_apart): a lone row (its greedy
    tokens then equal a speculative verify's) or a seeded one."""
    return len(rows) == 1 or _seeded(rows)


class Engine:
    """Decodes many completions together; each row has its own cache slot and positions.

    add() queues a completion; it joins the running batch at the next step() (prefilled into a free
    slot). step() picks one token for every row and returns [(completion, new text)] for each; rows that
    end leave and free their slot. A slot keeps its last row's tokens in cache: a new prompt that begins
    with them (a chat's next turn) prefills only the rest. add() and cancel() may be called from other
    threads than step()'s (the server's request handlers and its decode loop).

    compile=True runs the decode step under torch.compile (compiled_decode; its first step in a process
    reports its time through `log`): on a CPU over eager's rows and slots, so that greedy tokens are eager's
    (a lone or seeded row runs eager's step); with CUDA graphs, every slot over the whole cache.
    """

    slack = 0  # cache slots a row may write past its last token (drafted tokens, in speculative.py)

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int = 8, compile: bool = False,
                 log=None):
        if max_batch < 1:
            raise UserError(f"max_batch must be >= 1, not {max_batch}")
        self.model, self.tokenizer, self.max_batch, self.compile = model, tokenizer, max_batch, compile
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.compile_seconds: float | None = None  # what compiling the decode step took, if this engine did
        self._said_eager = False  # that --compile left a step to eager decoding (see _feed)
        self.device = model.lm_head.weight.device
        if compile:
            check_compiler(self.device)
        self._cache_rows = max(2, max_batch)  # >= 2: a step may feed a dummy row (see _min_rows)
        self._rows: list[Completion | None] = [None] * max_batch  # the completion in each slot
        self._cached: list[list[int]] = [[] for _ in range(self._cache_rows)]  # tokens whose K/V each row holds
        self._queue: deque[Completion] = deque()
        self._caches = None  # the KV cache, (_cache_rows, nh, cache_len, hs) per layer
        self._cache_len = 0
        self._logits: torch.Tensor | None = None  # (_cache_rows, V): each row's next-token logits
        self._masks = RowMasks(max_batch, model.config.vocab_size)  # constrained rows' allowed tokens, by slot

    def add(self, prompt_ids: list[int], sampling: SamplingConfig | None = None) -> Completion:
        """Queue a completion of prompt_ids; it joins the batch at the next step(). An empty prompt is
        unconditional generation: it starts from <|endoftext|>, as GPT-2 was trained (and as
        transformers' generate() does without input ids)."""
        sampling = sampling or SamplingConfig()
        prompt_ids = list(prompt_ids) or [self.tokenizer.eos_id]
        check_context(len(prompt_ids), sampling.max_new_tokens, self.model.config.block_size)
        vocab = self.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
            bad = next(t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab))
            raise UserError(f"prompt token {bad!r} is not a token id of this model (0 to {vocab - 1})")
        if bad := [t for t in sampling.logit_bias if t >= vocab]:
            raise UserError(f"logit_bias: {bad[0]} is not a token id of this model (0 to {vocab - 1})")
        if sampling.grammar is not None:
            compile_grammar(sampling.grammar, self.tokenizer, vocab)  # a malformed grammar fails here, once
        completion = Completion(prompt_ids, sampling, self.tokenizer)
        self._queue.append(completion)
        return completion

    def cancel(self, completion: Completion) -> None:
        """End a completion (finish_reason "cancelled"); its slot is freed at the next step()."""
        completion.cancel()

    @property
    def has_work(self) -> bool:
        return bool(self._queue) or any(c is not None for c in self._rows)

    @property
    def active(self) -> int:
        """Rows in the running batch."""
        return sum(c is not None for c in self._rows)

    @property
    def waiting(self) -> int:
        """Completions queued for a free slot."""
        return len(self._queue)

    @torch.inference_mode()
    def step(self) -> list[tuple[Completion, str]]:
        """One token for every row: [(completion, newly safe text)], the text possibly empty."""
        for slot, c in enumerate(self._rows):
            if c is not None and c.finished:  # cancelled since the last step
                self._rows[slot] = None
        self._admit()
        rows = [(slot, c) for slot, c in enumerate(self._rows) if c is not None]
        if not rows:
            return []
        out = [(c, c.push(token)) for (_, c), token in zip(rows, self._pick(rows))]
        for slot, c in rows:
            if c.finished:
                self._rows[slot] = None
        live = [(slot, c) for slot, c in rows if not c.finished]
        self._masks.start([(slot, c._grammar) for slot, c in live if c.constrained])  # overlaps the forward
        if live:
            self._feed(live)
        return out

    # ----- the steps --------------------------------------------------------------------------
    def _admit(self) -> None:
        """Prefill queued completions into free slots (each where the longest shared prefix is)."""
        joining: list[tuple[int, Completion]] = []
        free = [slot for slot, c in enumerate(self._rows) if c is None]
        while self._queue and free:
            c = self._queue.popleft()
            if c.finished:  # cancelled while waiting
                continue
            slot = max(free, key=lambda s: (_common_prefix(self._cached[s], c.prompt_ids), -s))
            free.remove(slot)
            joining.append((slot, c))
        if _seeded(joining):
            for row in joining:  # one prompt a forward: a seeded row's prompt rounds as it does alone
                self._prefill([row])
        elif joining:
            self._prefill(joining)

    def _prefill(self, joining: list[tuple[int, Completion]]) -> None:
        """One forward over the new rows' prompts (right-padded), after the prefix each slot holds."""
        self._ensure_cache(max(len(c.prompt_ids) + c.sampling.max_new_tokens for _, c in joining) + self.slack)
        starts = [min(_common_prefix(self._cached[slot], c.prompt_ids), len(c.prompt_ids) - 1)  # >= 1 token
                  for slot, c in joining]
        width = max(len(c.prompt_ids) - start for (_, c), start in zip(joining, starts))
        tokens, positions = [], []
        last = torch.zeros(len(joining), width, dtype=torch.bool)
        for i, ((slot, c), start) in enumerate(zip(joining, starts)):
            new = c.prompt_ids[start:]
            tokens.append(new + [0] * (width - len(new)))
            # padding writes past the prompt, which the row's decoding overwrites before reading
            positions.append([min(start + j, self._cache_len - 1) for j in range(width)])
            last[i, len(new) - 1] = True
            c.cached_tokens = start
            del self._cached[slot][start:]  # first, so that an interrupted prefill leaves no stale claim
        slots = [slot for slot, _ in joining]
        rows = slice(slots[0], slots[0] + 1) if len(slots) == 1 else torch.tensor(slots, device=self.device)
        logits = self.model(torch.tensor(tokens, device=self.device), kv_caches=self._caches, cache_rows=rows,
                            input_pos=torch.tensor(positions, device=self.device),
                            logits_at=last.to(self.device))  # (len(joining), V)
        self._logits[slots] = logits.float()
        for slot, c in joining:
            self._cached[slot] = list(c.prompt_ids)
            self._rows[slot] = c
            c._start(self.device, self._logits.shape[1])

    def _pick(self, rows: list[tuple[int, Completion]]) -> list[int]:
        """Each row's next token (batched: see completion.next_tokens; one transfer to the host), and the
        log-probs asked for."""
        slots = [slot for slot, _ in rows]
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        logits = self._logits[slots[0]:slots[-1] + 1] if contiguous else \
            self._logits[torch.tensor(slots, device=self.device)]  # (n, V)
        completions = [c for _, c in rows]
        tokens = next_tokens(logits, completions, self._masks, slots)
        want = [i for i, c in enumerate(completions) if c.sampling.logprobs is not None]
        if want:
            self._record_logprobs([completions[i] for i in want], logits[want], tokens[want])
        return tokens.tolist()

    @staticmethod
    def _record_logprobs(completions: list[Completion], logits: torch.Tensor, tokens: torch.Tensor) -> None:
        logprobs = logits.log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        k = min(max(c.sampling.logprobs for c in completions), logprobs.shape[1])
        top = logprobs.topk(k, dim=-1) if k else None
        top_values, top_ids = (top.values.tolist(), top.indices.tolist()) if k else ([], [])
        for i, (c, token) in enumerate(zip(completions, tokens.tolist())):
            n = c.sampling.logprobs
            alternatives = list(zip(top_ids[i][:n], top_values[i][:n])) if n else []
            c.logprobs.append(TokenLogprob(token, chosen[i], alternatives))

    @functools.cached_property
    def _min_rows(self) -> int:
        """Rows a step multiplies at least: 2 where one row rounds unlike several, so that a row alone gets
        the tokens of a speculative verify (a seeded row's step: 2 always, see _seeded). Detected on first
        use, on the thread that decodes and with its thread count (see commands/serve.py)."""
        return 1 if one_row_rounds_as_several(self.model) else 2

    def _rows_fed(self, live: list[tuple[int, Completion]], whole: bool = False):
        """(slots, cache rows) a step feeds: rows [0, n), free ones as dummies (all if `whole`), or a few
        rows left in high slots alone, their cache rows gathered."""
        least, top = 2 if _seeded(live) else self._min_rows, max(slot for slot, _ in live) + 1
        if whole or top <= 2 * max(least, len(live)):
            feed = list(range(self._cache_rows if whole else max(least, top)))
            return feed, slice(0, len(feed))
        feed = sorted(slot for slot, _ in live)
        feed += [slot for slot in range(self._cache_rows) if slot not in feed][:max(0, least - len(feed))]
        return feed, torch.tensor(feed, device=self.device)

    def _feed(self, live: list[tuple[int, Completion]]) -> None:
        """Run the newest token of every live row through the model: the next step's logits."""
        seeded = _seeded(live)
        apart = _apart(live)
        whole = self.compile and not seeded and self.device.type == "cuda"  # CUDA graphs: every row, whole cache
        feed, rows = self._rows_fed(live, whole)
        positions = [min(len(self._cached[slot]), self._cache_len - 1) for slot in feed]
        for slot, at in zip(feed, positions):  # free slots write a dummy just past what they hold in cache
            del self._cached[slot][at:]
        newest = {slot: c.token_ids[-1] for slot, c in live}  # one transfer: (n, 1) each
        x, pos = torch.tensor([[newest.get(slot, 0) for slot in feed], positions], device=self.device)[:, :, None]
        compiled = isinstance(rows, slice) and (whole or (self.compile and not apart))
        if self.compile and not compiled and not self._said_eager:  # --compile is never silently a no-op
            self._said_eager = True
            self.log("--compile: " + ("one row decodes with eager's exact path here (as fast), so --compile changes "
                     "nothing for one row (generate, chat); it serves batches (serve, eval)" if self.max_batch == 1 else
                     "some steps run eager decoding (a row alone, a seeded row, or rows left in high slots: eager's "
                     "exact path, as fast there); the compiled step serves the others"))
        if compiled:
            logits = self._compiled_step(x, pos, None if whole else max(positions) + 1)
        else:
            logits = _decode(self.model, x, pos, self._caches, rows, False, rows_apart=apart)
        self._logits[rows] = logits if isinstance(rows, slice) else logits.to(self._logits.dtype)  # (a cast in place)
        for slot, c in live:
            self._cached[slot].append(c.token_ids[-1])

    def _compiled_step(self, x: torch.Tensor, pos: torch.Tensor, length: int | None) -> torch.Tensor:
        """The compiled step for the len(x) first rows over their first `length` cache slots (None: all); the
        process's first call compiles it (timed: compile_seconds), and a failure there is one clear line."""
        step = compiled_decode(self.device)
        n = len(x)
        keys = [c.k if length is None else c.k[:n, :, :length] for c in self._caches]
        values = [c.v if length is None else c.v[:n, :, :length] for c in self._caches]
        for t in (x, pos, *keys, *values) if length is not None else ():  # new views each step: dynamic n, length
            torch._dynamo.maybe_mark_dynamic(t, [0] if t.dim() < 4 else [0, 2])
        if id(self.model) in _WARM:
            return step(self.model, x, pos, keys, values)
        start = time.perf_counter()
        try:
            logits = step(self.model, x, pos, keys, values)
        except Exception as e:  # noqa: BLE001 - torch.compile's failures come in many kinds
            if isinstance(e, (KeyboardInterrupt, UserError)):
                raise
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise OptionError("compile", lambda n: f"{n('compile')}: torch.compile failed on this machine "
                                                   f"({first.strip()[:200]}); drop {n('compile')}") from None
        _WARM.add(id(self.model))
        self.compile_seconds = time.perf_counter() - start
        self.log(f"compiled the decode step in {self.compile_seconds:.1f} s (once per process)")
        return logits

    def _ensure_cache(self, need: int) -> None:
        """Grow the cache (copying what it holds) to `need` slots per row (at least doubling)."""
        block = self.model.config.block_size
        if self._caches is not None and self._cache_len >= need:
            return
        length = min(block, max(need, 2 * self._cache_len))
        caches = self.model.new_cache(self._cache_rows, length)
        if self.compile:  # one compiled step for every cache length; fixed addresses for CUDA graphs (not
            for cache in caches:  # guarded: a new cache re-records the graph rather than recompiling the step)
                for t in (cache.k, cache.v):
                    torch._dynamo.maybe_mark_dynamic(t, 2)
                    if self.device.type == "cuda":
                        torch._dynamo.mark_static_address(t, guard=False)
        if self._caches is not None:
            for old, new in zip(self._caches, caches):
                new.k[:, :, :self._cache_len] = old.k
                new.v[:, :, :self._cache_len] = old.v
        else:
            self._logits = torch.zeros(self._cache_rows, self.model.config.vocab_size, device=self.device)
        self._caches, self._cache_len = caches, length


# ----- wrappers -----------------------------------------------------------------------------------
class Stream:
    """The text of one completion, piece by piece: `for piece in s: print(piece, end="")`.

    Afterwards .text, .finish_reason, .prompt_tokens, .completion_tokens (and .completion for the
    rest: token ids, stop_reason, logprobs, usage). The first iteration generates; iterating again
    replays the pieces already produced and generates nothing. Leaving the first loop early
    (break, an exception such as Ctrl-C) cancels the completion: finish_reason "cancelled", .text
    what was shown.
    """

    def __init__(self, engine: Engine, completion: Completion):
        self.engine, self.completion = engine, completion
        self._pieces: list[str] = []
        self._started = False

    def __iter__(self):
        if self._started:
            return iter(list(self._pieces))
        self._started = True
        return self._generate()

    def _generate(self):
        c = self.completion
        try:
            while not c.finished:
                for row, piece in self.engine.step():
                    if row is c and piece:
                        self._pieces.append(piece)
                        yield piece
        finally:
            self.engine.cancel(c)  # a no-op when it ended by itself

    SHARED = ("text", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens")  # the Completion's

    def __getattr__(self, name: str):
        if name in Stream.SHARED:
            return getattr(self.completion, name)
        raise AttributeError(f"'Stream' object has no attribute {name!r}")


def _sampling(cfg: SamplingConfig | None, kwargs: dict) -> SamplingConfig:
    if cfg is not None and kwargs:
        raise TypeError("pass either a SamplingConfig or sampling keywords, not both")
    return SamplingConfig.from_kwargs(**cfg) if isinstance(cfg, dict) else cfg or SamplingConfig.from_kwargs(**kwargs)


def _ids(tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


def stream(model: GPT, tokenizer: Tokenizer, prompt: str | list[int], cfg: SamplingConfig | None = None, *,
           compile: bool = False, **sampling) -> Stream:
    """Stream the completion of one prompt: `for piece in stream(model, tok, "Hi"): print(piece, end="")`."""
    engine = Engine(model, tokenizer, max_batch=1, compile=compile)
    return Stream(engine, engine.add(_ids(tokenizer, prompt), _sampling(cfg, sampling)))


def complete_batch(model: GPT, tokenizer: Tokenizer, prompts: list[str | list[int]],
                   cfg: SamplingConfig | list[SamplingConfig], batch_size: int = 8, compile: bool = False,
                   progress: str | None = None) -> list[Completion]:
    """Complete many prompts (one SamplingConfig, or one each), up to batch_size at a time (a finished row's
    slot goes to the next prompt at once); Completions carry text, finish_reason, stop_reason, usage and
    logprobs. `progress`: a bar of that name counts the finished prompts (on stderr)."""
    engine = Engine(model, tokenizer, max_batch=max(1, min(batch_size, len(prompts))), compile=compile)
    configs = cfg if isinstance(cfg, list) else [cfg] * len(prompts)
    completions = [engine.add(_ids(tokenizer, p), c) for p, c in zip(prompts, configs)]
    with progress_bar(total=len(prompts), desc=progress, unit="prompt", disable=progress is None, mininterval=1) as bar:
        while engine.has_work:
            engine.step()
            bar.update(sum(c.finished for c in completions) - bar.n)
    return completions


def generate_batch(model: GPT, tokenizer: Tokenizer, prompts: list[str | list[int]], cfg, batch_size: int = 8,
                   progress: str | None = None, compile: bool = False) -> list[str]:
    """The completions' texts (complete_batch's), each cut at EOS, a stop string or max_new_tokens."""
    return [c.text for c in complete_batch(model, tokenizer, prompts, cfg, batch_size, compile, progress)]


def generate(model: GPT, tokenizer: Tokenizer, prompt: str | list[str], cfg: SamplingConfig | None = None, *,
             compile: bool = False, **sampling) -> str | list[str]:
    """The completion of a prompt (or a list of completions for a list of prompts); prompts are text
    or token ids. Sampling: a SamplingConfig or its fields as keywords; compile: as Engine's."""
    one = isinstance(prompt, str) or bool(prompt) and all(isinstance(t, int) for t in prompt)  # text or token ids
    prompts = [prompt] if one else list(prompt)
    outputs = generate_batch(model, tokenizer, prompts, _sampling(cfg, sampling), compile=compile)
    return outputs[0] if one else outputs


class Session:
    """One conversation whose KV cache is kept between turns (for chat).

    complete(prompt_ids) prefills only the tokens after the longest prefix it shares with what the
    cache holds (the previous prompt and reply), so an unchanged history costs nothing; after an
    edit or dropped turns it recomputes from the first differing token. Returns a Stream; starting
    a new turn cancels an unfinished one. stream.completion.cached_tokens tells how many prompt
    tokens were reused.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, engine: Engine | None = None, **engine_options):
        self.engine = engine or Engine(model, tokenizer, max_batch=1, **engine_options)  # one row
        self._last: Completion | None = None

    def complete(self, prompt_ids: list[int], cfg: SamplingConfig | None = None, **sampling) -> Stream:
        if self._last is not None:
            self.engine.cancel(self._last)
        self._last = self.engine.add(list(prompt_ids), _sampling(cfg, sampling))
        return Stream(self.engine, self._last)

    def reset(self) -> None:
        """Forget the cache (the next turn prefills everything)."""
        self.engine._cached[0] = []


@torch.inference_mode()
def predict_next_token(model: GPT, tokenizer: Tokenizer, text: str, k: int = 5) -> list[tuple[str, float]]:
    """The k most likely next tokens after `text` (after <|endoftext|> for an empty text), with their
    probabilities."""
    ids = tokenizer.encode(text) or [tokenizer.eos_id]
    check_context(len(ids), 1, model.config.block_size)
    x = torch.tensor([ids], device=model.lm_head.weight.device)
    probs = model(x, logits_at="last")[0].float().softmax(-1)
    top = torch.topk(probs, k)
    return [(tokenizer.decode([i]), float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
