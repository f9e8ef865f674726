"""Reward grading throughput and worst-case latency: plain sequential grading vs. RewardHub.

For each rule-based rm_type, on a generated GRPO-like corpus (groups of 8 responses to one
prompt, with long reasoning before the answer and answers that repeat inside a group):

- plain: a loop calling the grader function directly, one sample after the other, in this
  process (no timeout, no cache);
- guarded (no cache): `batched_async_rm` through the worker pool with its timeout guard, cache
  off: what the guard itself costs or gains;
- guarded: `batched_async_rm` with the cache, kept for the whole corpus (one rollout).

The three take turns on blocks of whole groups (--block), so that all three see the same load
from other processes, until the corpus (or the optional time budget, --budget) runs out. Their rewards
are compared block by block, so a speed-up cannot come from grading differently.

Then an adversarial set (sympy bombs, a 1 MB response, regex-heavy strings) goes through
`async_rm` with a short rm_timeout (--adversarial-timeout), one call at a time; every call
must return within rm_timeout + 0.5 s.

    .venv/bin/python benchmarks/rewards.py [--n 5000] [--rm-types math,dapo] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import time
from dataclasses import dataclass

from slime_wf.rollout.rm_hub import RewardHub
from slime_wf.rollout.rm_hub.rules import GRADERS
from slime_wf.types import Sample

WORDS = (
    "we consider the sum of terms so that each factor divides both sides hence it follows that "
    "substituting back into the equation gives a quadratic whose roots satisfy vieta therefore "
    "checking the boundary case shows the inequality is strict and the minimum occurs when"
).split()
LATEX_BITS = [
    "$x^2+1$",
    "$\\frac{a}{b}$",
    "$\\sqrt{2}$",
    "$a_n = a_{n-1} + 2$",
    "$\\binom{n}{k}$",
    "$3 \\cdot 7 = 21$",
]


def reasoning(rng: random.Random) -> str:
    parts, size = [], rng.randint(400, 3000)
    while size > 0:
        piece = rng.choice(LATEX_BITS) if rng.random() < 0.12 else rng.choice(WORDS)
        parts.append(piece)
        size -= len(piece) + 1
    return " ".join(parts)


def math_problem(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """(label, equivalent answers, wrong answers) of one of several answer kinds."""
    kind = rng.choice(["int", "int", "int", "frac", "sqrt", "poly", "pi", "tuple", "decimal"])
    if kind == "int":
        k = rng.randint(-50, 2000)
        return str(k), [str(k), str(k), f"{k}.0"], [str(k + 1), str(2 * k), str(rng.randint(0, 999))]
    if kind == "frac":
        a, b = rng.choice([(1, 2), (2, 3), (3, 4), (5, 7), (7, 12), (11, 6), (9, 16)])
        label = f"\\frac{{{a}}}{{{b}}}"
        return (
            label,
            [label, f"\\dfrac{{{a}}}{{{b}}}", f"{a}/{b}"],
            [f"\\frac{{{b}}}{{{a}}}", f"\\frac{{{a + 1}}}{{{b}}}", f"{a * 2}/{b * 2}"],
        )
    if kind == "sqrt":
        k, m = rng.choice([(2, 3), (3, 2), (2, 5), (4, 3), (5, 2)])
        label = f"{k}\\sqrt{{{m}}}"
        return (
            label,
            [label, f"\\sqrt{{{k * k * m}}}"],
            [f"{k + 1}\\sqrt{{{m}}}", f"{k}\\sqrt{{{m + 1}}}", str(k * m)],
        )
    if kind == "poly":
        r1, r2 = rng.randint(1, 6), rng.randint(1, 6)
        label = f"x^2+{r1 + r2}x+{r1 * r2}"
        return (
            label,
            [label, f"(x+{r1})(x+{r2})"],
            [f"x^2+{r1 * r2}x+{r1 + r2}", f"(x-{r1})(x-{r2})", f"x^2+{r1 + r2}x"],
        )
    if kind == "pi":
        k, m = rng.choice([(1, 4), (3, 4), (2, 3), (5, 6)])
        label = f"\\frac{{{k}\\pi}}{{{m}}}"
        return (
            label,
            [label, f"\\frac{{{k}}}{{{m}}}\\pi"],
            [f"\\frac{{\\pi}}{{{m}}}", f"{k}\\pi", f"\\frac{{{m}\\pi}}{{{k}}}"],
        )
    if kind == "tuple":
        a, b = rng.randint(-9, 9), rng.randint(-9, 9)
        return f"({a},{b})", [f"({a},{b})", f"({a}, {b})"], [f"({b},{a})", f"({a},{b + 1})", f"({-a},{b})"]
    value = rng.choice([0.25, 1.5, 3.75, 2.125])
    return str(value), [str(value), f"{value}0"], [str(value * 2), str(value + 1), str(int(value))]


def int_problem(rng: random.Random) -> tuple[str, list[str], list[str]]:
    k = rng.randint(1, 5000)
    return str(k), [str(k), f"${k}$", f"{k:,}" if k >= 1000 else str(k)], [str(k + 1), str(k * 2), str(k - 7)]


F1_ANSWERS = [
    "the eiffel tower",
    "marie curie",
    "the treaty of versailles",
    "photosynthesis",
    "mount kilimanjaro",
    "george washington",
    "the mitochondria",
    "jupiter",
    "william shakespeare",
    "the pacific ocean",
]


def text_problem(rng: random.Random) -> tuple[str, list[str], list[str]]:
    label = rng.choice(F1_ANSWERS)
    wrong = rng.sample([a for a in F1_ANSWERS if a != label], 3)
    return label, [label, label.title(), label.removeprefix("the ")], wrong


def group(rng: random.Random, problem, style: str, size: int, group_index: int) -> list[Sample]:
    label, right, wrong = problem(rng)
    p_correct = rng.choice([0.0, 0.2, 0.5, 0.8, 1.0])
    samples = []
    for i in range(size):
        text = reasoning(rng)
        if rng.random() < 0.05:  # ran out of tokens: no answer at all
            response = "<think>" + text
        else:
            if rng.random() < p_correct:
                answer = right[0] if rng.random() < 0.7 else rng.choice(right)
            else:
                answer = rng.choices(wrong, weights=[6, 3, 1])[0]
            if style == "dapo":
                response = f"<think>{text}</think>\nThe result follows.\nAnswer: {answer}"
            elif style == "f1":
                response = f"<think>{text}</think>\nThe answer is {answer}."
            else:
                response = f"<think>{text}</think>\nSo the final answer is $\\boxed{{{answer}}}$."
        samples.append(
            Sample(group_index=group_index, index=group_index * size + i, response=response, label=label)
        )
    return samples


def corpus(rm_type: str, n: int, size: int, seed: int) -> list[list[Sample]]:
    rng = random.Random(f"{seed}-{rm_type}")
    problem, style = {"dapo": (int_problem, "dapo"), "f1": (text_problem, "f1")}.get(
        rm_type, (math_problem, "math")
    )
    return [group(rng, problem, style, size, g) for g in range(-(-n // size))]


def campaign_args(rm_type: str, timeout: float) -> argparse.Namespace:
    return argparse.Namespace(
        rm_type=rm_type,
        reward_key="score" if rm_type == "dapo" else None,
        custom_rm_path=None,
        group_rm=False,
        rm_url=None,
        rm_timeout=timeout,
        rm_failure_reward=0.0,
        rm_on_error="raise",
        rm_workers=None,
    )


def cpu_seconds(hub: RewardHub | None = None) -> float:
    """CPU time of this process (all threads) plus, on Linux, of the hub's worker processes."""
    total = time.process_time()
    for pid in hub.pool().worker_pids() if hub is not None else []:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")
    return total


@dataclass
class Totals:
    samples: int = 0
    graded: int = 0
    plain_s: float = 0.0
    plain_cpu: float = 0.0
    nocache_s: float = 0.0
    nocache_cpu: float = 0.0
    guarded_s: float = 0.0


async def measure(opts, rm_type: str, hub: RewardHub, nocache: RewardHub) -> Totals:
    """Plain, guarded without cache, and guarded, taking turns block by block on one corpus.

    Taking turns exposes all three to the same load from other processes. The guarded hub keeps
    its cache for the whole corpus (one rollout); blocks are whole groups.
    """
    groups = corpus(rm_type, opts.n, opts.group_size, opts.seed)
    args = campaign_args(rm_type, opts.rm_timeout)
    grader, totals = GRADERS[rm_type], Totals()
    hub.reset_cache()
    for first in range(0, len(groups), opts.block):
        samples = [s for g in groups[first : first + opts.block] for s in g]
        results = {}
        order = ["plain", "nocache", "guarded"]
        turn = first // opts.block % 3
        for side in order[turn:] + order[:turn]:
            if side == "plain":
                start, cpu = time.perf_counter(), time.process_time()
                results[side] = [grader(s.response, s.label) for s in samples]
                totals.plain_s += time.perf_counter() - start
                totals.plain_cpu += time.process_time() - cpu
            elif side == "nocache":
                start, cpu = time.perf_counter(), cpu_seconds(nocache)
                results[side] = await nocache.batched_async_rm(args, samples)
                totals.nocache_s += time.perf_counter() - start
                totals.nocache_cpu += cpu_seconds(nocache) - cpu
            else:
                before = hub.metrics()["rm/gradings"]
                start = time.perf_counter()
                results[side] = await hub.batched_async_rm(args, samples)
                totals.guarded_s += time.perf_counter() - start
                totals.graded += int(hub.metrics()["rm/gradings"] - before)
        if not results["plain"] == results["nocache"] == results["guarded"]:
            diff = [
                (s.index, s.response[-80:], s.label, p, n, g)
                for s, p, n, g in zip(
                    samples, results["plain"], results["nocache"], results["guarded"], strict=True
                )
                if not p == n == g
            ]
            timeouts = hub.metrics()["rm/timeouts"] + nocache.metrics()["rm/timeouts"]
            hint = f" ({timeouts:.0f} gradings timed out: a larger --rm-timeout?)" if timeouts else ""
            raise SystemExit(f"{rm_type}: guarded rewards differ from plain rewards{hint}: {diff[:5]}")
        totals.samples += len(samples)
        if opts.budget is not None and totals.plain_s + totals.nocache_s + totals.guarded_s > opts.budget:
            break
    return totals


ADVERSARIAL = [
    ("sympy factorial bomb", "math", "</think> \\boxed{9999999!x}", "x"),
    ("sympy power tower", "deepscaler", "</think> \\boxed{2**2**40}", "2x"),
    ("20,000-term sum", "math", "\\boxed{" + "+".join(["x"] * 20000) + "}", "20000x"),
    ("(x+1)^{100000} vs expanded", "math_verify", "\\boxed{(x+1)^{100000}}", "x^2+2x+1"),
    ("1 MB response", "f1", "word " * 200_000 + "the answer is 1", "1"),
    ("1 MB response", "math_verify", "x" * 1_000_000 + " so \\boxed{1}", "1"),
    ("1 MB response", "deepscaler", "<think>" + "y" * 1_000_000 + "</think> \\boxed{1}", "1"),
    ("regex: 100k '$1'", "math_verify", "$1" * 100_000, "1"),
    ("regex: 50k '\\text{'", "dapo", "Answer: " + "\\text{" * 50_000, "1"),
    ("nested braces", "math", "\\boxed{" + "{" * 50_000 + "1" + "}" * 50_000 + "}", "1"),
]


async def adversarial(hub: RewardHub, timeout: float) -> float:
    print(f"\nadversarial set (rm_timeout={timeout:g} s): one async_rm call at a time, timed by the caller")
    args = campaign_args("math", timeout)
    print(f"{'case':<30} {'rm_type':<12} {'seconds':>8}  result")
    longest = 0.0
    for i, (name, rm_type, response, label) in enumerate(ADVERSARIAL):
        sample = Sample(index=i, response=response, label=label, metadata={"rm_type": rm_type})
        start = time.perf_counter()
        reward = await hub.async_rm(args, sample)
        seconds = time.perf_counter() - start
        longest = max(longest, seconds)
        result = sample.metadata.get("rm_failure") or reward
        print(f"{name:<30} {rm_type:<12} {seconds:>8.2f}  {str(result)[:60]}", flush=True)
    print(f"longest single call: {longest:.2f} s (bound: rm_timeout + 0.5 = {timeout + 0.5:.2f} s)")
    return longest


async def main_async(opts: argparse.Namespace) -> int:
    rm_types = [t for t in opts.rm_types.split(",") if t]
    print(
        f"{opts.n} samples per rm_type in groups of {opts.group_size}; workers: {opts.workers or 'one per core'}; "
        f"turns of {opts.block} groups"
        + (f", up to {opts.budget:g} s per rm_type" if opts.budget else "")
        + "; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    hub = RewardHub(num_workers=opts.workers)
    nocache = RewardHub(num_workers=opts.workers, cache=False)
    start = time.perf_counter()
    warm = [Sample(index=i, response=f"\\boxed{{{i}}}", label="1") for i in range(16)]
    await hub.batched_async_rm(campaign_args("math", opts.rm_timeout), warm)
    await nocache.batched_async_rm(campaign_args("math", opts.rm_timeout), warm)
    print(
        f"worker pools started in {time.perf_counter() - start:.1f} s (once per process; not in the rates below)\n"
    )

    rows = []
    for rm_type in rm_types:
        # warm this process up like the workers are (imports, parser tables), on other samples
        for sample in corpus(rm_type, 16, opts.group_size, opts.seed + 1000)[0]:
            GRADERS[rm_type](sample.response, sample.label)
        rows.append((rm_type, await measure(opts, rm_type, hub, nocache)))
        print(f"  {rm_type}: done", flush=True)
    nocache.close()

    print(
        f"\n{'rm_type':<12} {'samples':>8} {'plain/s':>9} {'no-cache/s':>11} {'CPU x':>6} {'guarded/s':>10} "
        f"{'graded':>7} {'ratio':>6}"
    )
    for rm_type, t in rows:
        plain, guarded = t.samples / t.plain_s, t.samples / t.guarded_s
        print(
            f"{rm_type:<12} {t.samples:>8} {plain:>9.0f} {t.samples / t.nocache_s:>11.0f} "
            f"{t.nocache_cpu / t.plain_cpu:>6.2f} {guarded:>10.0f} {t.graded / t.samples:>6.0%} "
            f"{guarded / plain:>6.2f}"
        )
    print(
        "samples: graded by each of the three (all of the corpus, or as many blocks as --budget allowed);\n"
        "no-cache/s: guarded without the cache; CPU x: its CPU time (this process and the workers) over "
        "plain's;\ngraded: share of samples the guarded hub actually graded (the rest were cache hits); "
        "ratio: guarded/s over plain/s"
    )
    print(f"load average now {os.getloadavg()[0]:.1f}")

    ok = True
    if not opts.skip_adversarial:
        ok = await adversarial(hub, opts.adversarial_timeout) <= opts.adversarial_timeout + 0.5
        print("bound kept" if ok else "BOUND EXCEEDED")
    hub.close()
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="samples per rm_type (default 5000)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--rm-types", default="deepscaler,math,dapo,f1,math_verify")
    parser.add_argument("--workers", type=int, default=None, help="grader processes (default: one per core)")
    parser.add_argument(
        "--rm-timeout",
        type=float,
        default=30.0,
        help="rm_timeout while measuring throughput (default 30, the campaign default)",
    )
    parser.add_argument(
        "--adversarial-timeout",
        type=float,
        default=2.0,
        help="rm_timeout for the adversarial set (default 2)",
    )
    parser.add_argument("--block", type=int, default=32, help="groups per turn (default 32)")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="stop an rm_type after this many seconds, all three sides together, skipping the rest of "
        "its corpus (default: grade the whole corpus)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-adversarial", action="store_true")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    return asyncio.run(main_async(opts))


if __name__ == "__main__":
    sys.exit(main())
