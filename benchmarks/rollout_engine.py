"""Rollout engine benchmark: the local engine server against transformers' static-batching `generate`.

    .venv/bin/python benchmarks/rollout_engine.py [--requests 32] [--threads 1] [--layers 4] [--hidden 256]
        [--vocab 8192] [--min-new 16] [--max-new 128] [--repeats 2] [--skip-cb]

Builds a random Qwen3-shaped checkpoint, draws `--requests` prompts of ragged lengths (16-128
tokens) and per-request `max_new_tokens` (`--min-new`..`--max-new`), all with ignore_eos so the
amount of work is fixed, then generates them with

- transformers `generate`, static batching: prompts left-padded into one batch, one call with the
  largest `max_new_tokens`; only each request's requested tokens count as useful;
- transformers continuous batching (`ContinuousBatchingManager`, per-request `max_new_tokens`),
  for reference (skip with `--skip-cb`);
- the local engine server (subprocess, `--num-threads` = `--threads`), all requests sent at once
  over HTTP, as the rollout does, with `return_logprob`.

All sample at temperature 1 over the full vocabulary, in float32, with the same torch thread count.
Each implementation runs `--repeats` times (alternating order) and keeps its best times. Prints one
table: wall seconds, useful tokens/s and the ratio to static `generate`, then the same by CPU
seconds of the generating process (the server's for the local engine), which other load on a
shared machine disturbs much less than wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers.tiny_models import make_tiny_model  # noqa: E402


def workload(n: int, vocab: int, min_new: int, max_new: int, seed: int = 0) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        plen = int(torch.randint(16, 129, (1,), generator=g))
        new = int(torch.randint(min_new, max_new + 1, (1,), generator=g))
        out.append((torch.randint(4, vocab, (plen,), generator=g).tolist(), new))
    return out


def timed(fn) -> tuple[float, float]:
    """Wall and CPU seconds of `fn()` in this process (CPU time is robust to other load on a shared machine)."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_static_generate(model, work) -> float:
    pad = 1
    width = max(len(p) for p, _ in work)
    ids = torch.full((len(work), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, _) in enumerate(work):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    longest = max(n for _, n in work)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad,
            output_scores=True,
            return_dict_in_generate=True,
        )
        # The log-probs a rollout records, for the requested tokens only.
        scores = torch.stack(out.scores, 1).log_softmax(-1)
        new = out.sequences[:, width:]
        _ = scores.gather(2, new[:, :, None])
    wall = time.perf_counter() - start
    assert new.shape[1] == longest
    return wall


def run_continuous_batching(model, work) -> float:
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max(n for _, n in work),
        eos_token_id=-1,
        pad_token_id=1,
    )
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        start = time.perf_counter()
        for i, (p, n) in enumerate(work):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
        done: dict[str, int] = {}
        deadline = time.monotonic() + 600
        while len(done) < len(work) and time.monotonic() < deadline:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done[result.request_id] = len(result.generated_tokens)
        wall = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    expected = {f"r{i}": n for i, (_, n) in enumerate(work)}
    if done != expected:
        raise RuntimeError(
            f"continuous batching produced {len(done)} of {len(work)} requests with the right lengths"
        )
    return wall


class LocalServer:
    """The local engine server as a subprocess, started once and timed over several rounds."""

    def __init__(self, model_dir: Path, threads: int, max_running: int, log: Path):
        from slime_wf.servers import free_port

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        cmd = [
            sys.executable,
            "-m",
            "slime_wf.engine_server",
            "--model-path",
            str(model_dir),
            "--port",
            str(port),
            "--num-threads",
            str(threads),
            "--max-running-requests",
            str(max_running),
        ]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout: float = 300) -> None:
        import urllib.request

        from slime_wf.servers import ProcessExited, wait_until

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(self.url + "/health_generate", timeout=30) as resp:
                    return resp.status == 200
            except OSError:
                return False

        try:
            wait_until(healthy, "the local server", timeout_s=timeout, process=self.proc)
        except (ProcessExited, TimeoutError):
            raise RuntimeError(f"local server did not start:\n{self.log.read_text()[-3000:]}") from None

    def run(self, work) -> tuple[float, float]:
        import aiohttp

        async def drive() -> tuple[float, float]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

                async def one(i, prompt, n):
                    body = {
                        "rid": f"r{i}-{time.monotonic_ns()}",
                        "input_ids": prompt,
                        "return_logprob": True,
                        "sampling_params": {"max_new_tokens": n, "temperature": 1.0, "ignore_eos": True},
                    }
                    async with session.post(self.url + "/generate", json=body) as resp:
                        out = await resp.json()
                        assert resp.status == 200, out
                        assert len(out["output_ids"]) == n, out["meta_info"]
                        return out

                await one(-1, work[0][0], 4)  # warm-up
                cpu, start = self._cpu(), time.perf_counter()
                await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(work)))
                return time.perf_counter() - start, self._cpu() - cpu

        return asyncio.run(drive())

    def _cpu(self) -> float:
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for every implementation (more than 1 on a busy machine oversubscribes)",
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--min-new", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--skip-cb", action="store_true", help="skip transformers' continuous batching")
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds, alternating order; the best time counts"
    )
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(
            Path(tmp) / "model",
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            vocab_size=args.vocab,
            max_positions=1024,
        )
        work = workload(args.requests, args.vocab, args.min_new, args.max_new)
        useful = sum(n for _, n in work)
        print(
            f"model: Qwen3-shaped, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, float32, "
            f"{args.threads} threads",
            flush=True,
        )
        print(
            f"work: {len(work)} requests, prompts {min(len(p) for p, _ in work)}-{max(len(p) for p, _ in work)} "
            f"tokens, max_new_tokens {min(n for _, n in work)}-{max(n for _, n in work)}, "
            f"{useful} useful tokens",
            flush=True,
        )

        server = LocalServer(model_dir, args.threads, len(work), Path(tmp) / "server.log")
        try:
            server.wait_ready()  # loads beside nothing else that is timed
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            model.generation_config.eos_token_id = None
            run_static_generate(model, work[:2])  # warm-up
            impls = {
                "transformers generate (static batch)": lambda: timed(
                    lambda: run_static_generate(model, work)
                ),
                "local engine server (HTTP)": lambda: server.run(work),
            }
            if not args.skip_cb:
                impls["transformers continuous batching"] = lambda: timed(
                    lambda: run_continuous_batching(model, work)
                )
            best: dict[str, tuple[float, float]] = {}
            for round_ in range(args.repeats):
                # Alternate the order: background load on a shared machine drifts over minutes.
                for name in list(impls) if round_ % 2 == 0 else list(reversed(impls)):
                    try:
                        wall, cpu = impls[name]()
                    except Exception as err:  # report, do not hide, a failing implementation
                        print(f"  round {round_ + 1}: {name} failed: {type(err).__name__}: {err}", flush=True)
                        continue
                    old = best.get(name, (float("inf"), float("inf")))
                    best[name] = (min(old[0], wall), min(old[1], cpu))
                    print(f"  round {round_ + 1}: {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
        finally:
            server.stop()
        rows = [(name, best[name]) for name in impls if name in best]

    base_wall, base_cpu = useful / rows[0][1][0], useful / rows[0][1][1]
    print()
    print(
        f"| {'impl':38} | {'wall s':>7} | {'useful tok/s':>12} | {'ratio':>6} | {'CPU s':>7} | {'tok/CPU-s':>9} | {'ratio':>6} |"
    )
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 14}|{'-' * 8}|{'-' * 9}|{'-' * 11}|{'-' * 8}|")
    for name, (wall, cpu) in rows:
        print(
            f"| {name:38} | {wall:7.2f} | {useful / wall:12.1f} | {useful / wall / base_wall:5.2f}x "
            f"| {cpu:7.2f} | {useful / cpu:9.1f} | {useful / cpu / base_cpu:5.2f}x |"
        )


if __name__ == "__main__":
    main()
