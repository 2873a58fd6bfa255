"""`gpt2ft serve` under concurrent streaming clients: continuous batching vs serving one at a time.

    python -m benchmarks.bench_serve                      # GPT-2 124M architecture, random weights, CPU
    python -m benchmarks.bench_serve --clients 1 8 --max-tokens 32

Starts the real server twice on 127.0.0.1 (--max-batch N, and --max-batch 1: requests queue and are
served one at a time), sends the same greedy streaming requests from 1, 8 and 32 concurrent clients to
one, then the other, for --rounds alternating rounds, and prints aggregate tokens/s (best and median)
and p50/p99 latency (request sent -> last byte) for both, and whether both return the same texts.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2ft.runtime import inference_dtype

from .common import machine


def make_model(folder: Path, preset: str) -> Path:
    import torch

    from gpt2ft.checkpoint import save_model
    from gpt2ft.config import PRESETS
    from gpt2ft.model import GPT
    from gpt2ft.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    return save_model(folder / preset, GPT(PRESETS[preset]), gpt2_tokenizer())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, max_batch: int, extra: list[str]):
        import httpx

        self.url = f"http://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "gpt2ft.cli", "serve", str(model), "--name", "m", "--port", self.url.rsplit(":", 1)[1],
               "--max-batch", str(max_batch), "--max-queue", "256", *extra]
        self.log = tempfile.NamedTemporaryFile(prefix="bench_serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(600):
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def prompt(i: int, words: int) -> str:
    return f"Client {i} writes:" + " and then" * (words // 2)


async def run_clients(url: str, n: int, max_tokens: int, prompt_words: int) -> dict:
    import httpx

    async def one(client, i):
        body = {"model": "m", "prompt": prompt(i, prompt_words), "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        text, used, first = "", 0, None
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    text += chunk["choices"][0]["text"]
                    first = first or time.perf_counter() - start
                if chunk.get("usage"):
                    used = chunk["usage"]["completion_tokens"]
        return text, used, time.perf_counter() - start, first

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=n + 4)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, i) for i in range(n)))
        wall = time.perf_counter() - start
    latencies = sorted(r[2] for r in results)
    tokens = sum(r[1] for r in results)
    return {"texts": [r[0] for r in results], "tokens": tokens, "wall": wall, "tok_s": tokens / wall,
            "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "ttft_p50": statistics.median(r[3] or 0 for r in results)}


def engine_alone(model_dir: Path, dtype: str, device: str, n: int, max_batch: int, max_tokens: int,
                 prompt_words: int) -> float:
    """Tokens/s of the same n greedy completions through the server's engine in this process (no HTTP, no
    clients): what batching gives before any serving work; max_batch 1 serves them one at a time."""
    from gpt2ft.checkpoint import load
    from gpt2ft.generation import Engine, SamplingConfig

    if model_dir not in _loaded:  # the dtype the server picks for the same --dtype
        _loaded[model_dir] = load(model_dir, device, inference_dtype(dtype, torch.device(device))[0])
    loaded = _loaded[model_dir]
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=max_batch)
    start = time.perf_counter()
    done = [engine.add(loaded.tokenizer.encode(prompt(i, prompt_words)),
                       SamplingConfig(max_new_tokens=max_tokens, temperature=0)) for i in range(n)]
    while engine.has_work:
        engine.step()
    return sum(c.usage["completion_tokens"] for c in done) / (time.perf_counter() - start)


_loaded: dict = {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=30, help="about this many prompt tokens")
    p.add_argument("--preset", default="gpt2", help="model architecture (random weights)")
    p.add_argument("--max-batch", type=int, default=32, help="the batched server's --max-batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="the server's --dtype (auto: as gpt2ft picks it here)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (batched, then one at a time)")
    p.add_argument("--engine-alone", action="store_true",
                   help="also time the same completions through the engine in this process (no HTTP), in the same "
                        "rounds: the ratio batching gives before any serving work")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    extra = ["--device", args.device, "--dtype", args.dtype, "--max-tokens", str(args.max_tokens)]
    labels = {"batched": args.max_batch, "one at a time": 1}
    results = {label: {n: [] for n in args.clients} for label in labels}
    alone = {batch: {n: [] for n in args.clients} for batch in labels.values()}  # --engine-alone: tokens/s
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp), args.preset)
        servers = {}
        try:  # both servers up at once, so that each round can alternate between them
            for label, batch in labels.items():
                servers[label] = Server(model, batch, extra)
                asyncio.run(run_clients(servers[label].url, 1, 4, args.prompt_words))  # warm-up
            for _ in range(args.rounds):
                for n in args.clients:
                    for label, server in servers.items():
                        results[label][n].append(asyncio.run(run_clients(server.url, n, args.max_tokens,
                                                                         args.prompt_words)))
                    for batch in alone if args.engine_alone else ():
                        alone[batch][n].append(engine_alone(model, args.dtype, args.device, n, batch,
                                                            args.max_tokens, args.prompt_words))
        finally:
            for server in servers.values():
                server.stop()
    dtype = str(inference_dtype(args.dtype, torch.device(args.device))[0]).removeprefix("torch.")
    print(f"\ngpt2ft serve, {args.preset} architecture (random weights), {dtype} on {args.device}, "
          f"~{args.prompt_words}-token prompts + {args.max_tokens} new tokens, greedy, streaming, {args.rounds} "
          f"alternating rounds, best / median ({machine()}; load average {os.getloadavg()[0]:.1f} at the end)")
    print("| clients | one at a time: tok/s | p50 / p99 latency (median run) | batched (--max-batch "
          f"{args.max_batch}): tok/s | p50 / p99 latency (median run) | throughput ratio best / median | same texts |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in args.clients:
        runs = {label: sorted(results[label][n], key=lambda r: r["tok_s"]) for label in labels}
        best = {label: r[-1]["tok_s"] for label, r in runs.items()}
        mid = {label: r[len(r) // 2] for label, r in runs.items()}
        a, b = mid["one at a time"], mid["batched"]
        same = all(x["texts"] == y["texts"] for x, y in zip(runs["one at a time"], runs["batched"]))
        print(f"| {n} | {best['one at a time']:.1f} / {a['tok_s']:.1f} | {a['p50']:.2f} s / {a['p99']:.2f} s | "
              f"{best['batched']:.1f} / {b['tok_s']:.1f} | {b['p50']:.2f} s / {b['p99']:.2f} s | "
              f"{best['batched'] / best['one at a time']:.2f}x / {b['tok_s'] / a['tok_s']:.2f}x | "
              f"{'yes' if same else 'NO'} |")
    for n in args.clients if args.engine_alone else ():
        one, many = (sorted(alone[batch][n]) for batch in (1, args.max_batch))
        print(f"| {n}, the engine alone (no HTTP) | {one[-1]:.1f} / {one[len(one) // 2]:.1f} | | {many[-1]:.1f} / "
              f"{many[len(many) // 2]:.1f} | | {many[-1] / one[-1]:.2f}x / {many[len(many) // 2] / one[len(one) // 2]:.2f}x | |")


if __name__ == "__main__":
    main()
