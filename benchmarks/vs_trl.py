"""slime-wf against TRL's GRPOTrainer on the same GRPO work, side by side in one run.

    .venv/bin/python benchmarks/vs_trl.py [--work 12m 1m tiny-math] [--steps 8] [--sides trl flow plain]
        [--repeat 1] [--plain-all] [--keep DIR]
    .venv/bin/python benchmarks/vs_trl.py --work tiny-math --steps 6 --repeat 2   # a few minutes on 2 cores

Three works, each run by every side on the same model files, prompts, reward, sampling and loss:

- `12m`: a random Qwen3 (hidden 512, 4 layers, 8 heads, vocabulary padded to 5400: 12.2M
  parameters), plain-text prompts "What is a + b? Answer: \\boxed{", responses up to 128 tokens,
  lr 1e-5;
- `1m`: the same with hidden 256, 2 layers (1.18M parameters), responses up to 32 tokens;
- `tiny-math`: the demo's warm-started model and prompts (`examples/tiny-math/assets`, made by
  its make_assets.py), chat template, rm_type math, 16 prompts x 8 samples, up to 8 tokens,
  lr 3e-4, pure GRPO (no filter, no partial rollout, no stop string, no FP8 copy).

The 12m and 1m works use 8 prompts x 8 samples and the reward of the issue: 1 when the last
`\\boxed{}` integer of the response (else its last integer) equals a + b. Every work: GRPO with
beta 0 and the group std normalization, per-sample loss averaging, eps clip 0.2, constant lr, no
weight decay, gradient clip 1.0, one optimizer step of one micro-batch of 64 (128 for
tiny-math) samples per step, temperature 1, 2 torch threads, a checkpoint only at the end.

Sides, each in its own process (`--sides`):

- `trl`: TRL's `GRPOTrainer` (the `bench` extra) with transformers' `generate`;
- `flow`: `slime-wf train`, the Prefect flow, against a Prefect server started here (its start-up
  is not counted), with one local engine of 2 threads;
- `plain`: the same campaign in the library loop `Campaign.run` (tiny-math only unless `--plain-all`);
- `async`: the flow with `rollout.train_async: true` (slime's train_async: rollout id+1 is generated
  while id trains, the engines get the new weights after each step; tokens are at most one weight
  version behind), the 2 threads shared: one for the engine, one for the trainer. Not among the
  default sides: `--sides trl async`.

A slime-wf side may carry config overrides, to measure a setting against its baseline in one run:
`plain@rollout.sglang_server_concurrency=64` is the plain loop with that value (YAML, as in the
campaign file; several joined by `,`); the section `env` sets the side's environment instead:
`flow@env.SLIME_WF_KEEP_FREED_MEMORY=0`. Goals are judged for sides without overrides.

    .venv/bin/python benchmarks/vs_trl.py --work tiny-math --repeat 2 \
        --sides trl plain plain@rollout.sglang_server_concurrency=64

Time per step: TRL's wall time between the ends of consecutive optimizer steps; slime-wf's, the
wall time between consecutive rollout ids (the write times of `rollouts/<id>/rollout.json`, the
last file a rollout writes), so everything a user waits for counts. The median over the steps
after the first is reported (with `--repeat`, over the steps of every run; the runs of the sides
alternate their order). Ratio = TRL s/step / side s/step (above 1: faster than TRL). Mean
response length and the mean reward of the last 5 steps show that the work is the same.

CPU seconds per step, over the same steps: the side's processes (the process and all it started:
engines, reward workers, trainers) and, for the flow, the Prefect server's (the process listening on
the API's port; it records each task run's states and each artifact). Where the sides together need
more CPU seconds per step than there are cores, the steps' wall time is their CPU time over the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import psutil

ROOT = Path(__file__).resolve().parent.parent
TINY_MATH = ROOT / "examples" / "tiny-math" / "assets"
THREADS = 2
# TRL s/step / slime-wf s/step that the issue asks for, by work and side
GOALS = {
    ("12m", "flow"): 1.5,
    ("1m", "flow"): 1.2,
    ("tiny-math", "plain"): 1.0,
    ("tiny-math", "flow"): 0.5,
    ("12m", "async"): 2.0,
}


@dataclass(frozen=True)
class Work:
    name: str
    prompts: int
    samples: int
    max_tokens: int
    lr: float
    layers: int = 0  # 0: the tiny-math demo's model
    hidden: int = 0
    heads: int = 0
    vocab: int = 0


WORKS = {
    "12m": Work("12m", 8, 8, 128, 1e-5, layers=4, hidden=512, heads=8, vocab=5400),
    "1m": Work("1m", 8, 8, 32, 1e-5, layers=2, hidden=256, heads=4),
    "tiny-math": Work("tiny-math", 16, 8, 8, 3e-4),
}

SIDES = ("trl", "flow", "plain", "async")


def side_spec(spec: str) -> tuple[str, dict[str, dict[str, object]]]:
    """`flow` -> ("flow", {}); `plain@rollout.x=1,train.lr=2e-5` -> ("plain", {"rollout": {"x": 1}, ...})."""
    import yaml

    base, _, rest = spec.partition("@")
    if base not in SIDES or (rest and base == "trl"):
        raise argparse.ArgumentTypeError(
            f"side {spec!r}: one of {', '.join(SIDES)}, a slime-wf side optionally with @section.key=value,..."
        )
    overrides: dict[str, dict[str, object]] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (eq and dot and section and name):
            raise argparse.ArgumentTypeError(f"side {spec!r}: {item!r} is not section.key=value")
        overrides.setdefault(section, {})[name] = yaml.safe_load(value)
    return base, overrides


_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")
_INTEGER = re.compile(r"-?\d+")


def addition_score(response: str, label: str) -> float:
    """1 when the last boxed integer of `response` (else its last integer) equals `label`."""
    found = _BOXED.findall(response) or _INTEGER.findall(response)
    return 1.0 if found and found[-1].strip() == str(label).strip() else 0.0


async def addition_reward(args, sample) -> float:
    """slime-wf's custom reward (`reward.custom_rm_path`) for the 12m and 1m works."""
    return addition_score(sample.response, sample.label)


# ---- the work's files ------------------------------------------------------------------------


def make_assets(work: Work, folder: Path) -> dict[str, str]:
    """The model folder and the prompt file of `work` (made once under `folder`)."""
    if work.name == "tiny-math":
        if not (TINY_MATH / "model" / "config.json").exists():
            raise SystemExit(
                f"tiny-math: no demo model in {TINY_MATH}; make it first: "
                "python examples/tiny-math/make_assets.py --out examples/tiny-math/assets"
            )
        return {"model": str(TINY_MATH / "model"), "data": str(TINY_MATH / "train.jsonl"), "chat": "1"}
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.tiny_models import make_tiny_model

    model = folder / "model"
    if not (model / "config.json").exists():
        make_tiny_model(
            model,
            layers=work.layers,
            hidden=work.hidden,
            heads=work.heads,
            vocab_size=work.vocab or None,
            max_positions=512,
            seed=0,
        )
    data = folder / "prompts.jsonl"
    rows = [
        {"prompt": f"What is {a} + {b}? Answer: \\boxed{{", "label": str(a + b)}
        for a in range(20)
        for b in range(20)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(model), "data": str(data), "chat": ""}


def parameter_count(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for shard in Path(model_dir).glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                count = 1
                for n in f.get_slice(key).get_shape():
                    count *= int(n)
                total += count
    return total


def load_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- TRL -------------------------------------------------------------------------------------


def run_trl(work: Work, assets: dict[str, str], root: Path, steps: int, seed: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    chat = bool(assets["chat"])
    rows = load_jsonl(assets["data"])
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}] if chat else r["prompt"],
                "label": r["label"],
            }
            for r in rows
        ]
    )
    if chat:
        from slime_wf.rollout.rm_hub.rules import grade

        def score(text: str, label: str) -> float:
            return float(grade("math", text, label))
    else:
        score = addition_score

    def reward(completions, label, **kwargs) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [score(t, lab) for t, lab in zip(texts, label, strict=True)]

    batch = work.prompts * work.samples
    config = GRPOConfig(
        output_dir=str(root / "trl"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=work.samples,
        max_completion_length=work.max_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=work.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        num_iterations=1,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        bf16=False,
        fp16=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    ends: list[float] = []
    logged: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                logged.append(dict(logs))

    trainer = GRPOTrainer(model=assets["model"], reward_funcs=reward, args=config, train_dataset=dataset)
    trainer.add_callback(Clock())
    trainer.train()
    return {
        "step_s": [b - a for a, b in zip(ends, ends[1:], strict=False)],
        "marks": ends,
        "response_len": [float(entry.get("completions/mean_length", float("nan"))) for entry in logged],
        "reward": [float(entry["reward"]) for entry in logged],
    }


# ---- slime-wf ----------------------------------------------------------------------------------


def campaign_dict(
    work: Work,
    assets: dict[str, str],
    root: Path,
    name: str,
    steps: int,
    seed: int,
    train_async: bool = False,
) -> dict:
    chat = bool(assets["chat"])
    return {
        "campaign": name,
        "model": {"hf_checkpoint": assets["model"], "cache_dir": str(root / "cache"), "rollout_fp8": False},
        "data": {
            "prompt_data": assets["data"],
            "apply_chat_template": chat,
            "rollout_shuffle": True,
            "rollout_seed": seed,
        },
        "rollout": {
            "num_rollout": steps,
            "rollout_batch_size": work.prompts,
            "n_samples_per_prompt": work.samples,
            "rollout_max_response_len": work.max_tokens,
            "rollout_temperature": 1.0,
            "train_async": train_async,
        },
        # train_async: the engine and the trainer compute at the same time, so they share the threads
        # (the trainer gets the cores the engine leaves: `engine.local_engine_threads`)
        "engine": {
            "engine_type": "local",
            "num_engines": 1,
            "local_engine_threads": max(1, THREADS // 2) if train_async else THREADS,
        },
        "reward": {"rm_type": "math"} if chat else {"custom_rm_path": "vs_trl.addition_reward"},
        "train": {
            "advantage_estimator": "grpo",
            "lr": work.lr,
            "lr_decay_style": "constant",
            "weight_decay": 0.0,
            "clip_grad": 1.0,
            "micro_batch_size": work.prompts * work.samples,
            "seed": seed,
        },
        "checkpoint": {"save_interval": None},
        "storage": {"store": str(root / "store"), "scratch_dir": str(root / "scratch" / name)},
    }


def slime_results(cfg: dict) -> dict:
    """Per-step wall time (between the rollout.json writes of consecutive ids), mean response
    length and raw reward, read from the run store."""
    rollouts = Path(cfg["storage"]["store"]) / cfg["campaign"] / "rollouts"
    marks, lengths, rewards = [], [], []
    for rid in range(cfg["rollout"]["num_rollout"]):
        folder = rollouts / f"{rid:06d}"
        marks.append((folder / "rollout.json").stat().st_mtime)
        samples = load_jsonl(str(folder / "samples.jsonl"))
        lengths.append(statistics.fmean(s["response_length"] for s in samples))
        rewards.append(statistics.fmean(float(s["reward"]) for s in samples))
    return {
        "step_s": [b - a for a, b in zip(marks, marks[1:], strict=False)],
        "marks": marks,
        "response_len": lengths,
        "reward": rewards,
    }


def run_slime(side: str, work: Work, assets: dict[str, str], root: Path, steps: int, seed: int) -> dict:
    import torch
    import yaml

    torch.set_num_threads(THREADS)
    side, overrides = side_spec(side)
    name = f"vs-trl-{work.name}-{side}-{time.strftime('%H%M%S')}"
    cfg = campaign_dict(work, assets, root, name, steps, seed, train_async=side == "async")
    for section, values in overrides.items():
        if section != "env":  # the side's environment (run_side)
            cfg.setdefault(section, {}).update(values)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if side in ("flow", "async"):
        cli = Path(sys.executable).parent / "slime-wf"
        subprocess.run(
            [str(cli), "train", "--config", str(path)], check=True, cwd=root, stdout=subprocess.DEVNULL
        )
    else:
        from slime_wf.campaign import Campaign
        from slime_wf.config import CampaignConfig

        with Campaign(CampaignConfig.from_yaml(str(path), [])) as campaign:
            campaign.run()
    return slime_results(cfg)


# ---- the run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def prefect_api(home: Path, needed: bool):
    if not needed or os.environ.get("PREFECT_API_URL"):
        yield os.environ.get("PREFECT_API_URL")
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.prefect_server import local_prefect_server

    with local_prefect_server(home) as api:
        yield api


def run_side(
    side: str, work: Work, assets: dict[str, str], root: Path, steps: int, seed: int, api: str | None
) -> dict:
    """One side of one work in a fresh process (threads, caches and memory of its own)."""
    out = root / f"{work.name}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', side)}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)]))
    env.update({k: str(v) for k, v in side_spec(side)[1].get("env", {}).items()})
    env.update(OMP_NUM_THREADS=str(THREADS), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if api:
        env["PREFECT_API_URL"] = api
    args = [sys.executable, __file__, "--_side", side, "--_root", str(root), "--_out", str(out)]
    args += ["--work", work.name, "--steps", str(steps), "--seed", str(seed), "--_assets", json.dumps(assets)]
    t0 = time.perf_counter()
    with subprocess.Popen(
        args, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as child:
        clock = CpuClock(child.pid, api)
        stderr = clock.run_until_exit(child)
    if child.returncode:
        print(f"{work.name} {side} failed (exit {child.returncode}):\n{stderr[-4000:]}", file=sys.stderr)
        return {}
    result = json.loads(out.read_text())
    result["total_s"] = time.perf_counter() - t0
    result.update(clock.per_step(result["marks"]))  # over the steps counted
    return result


class CpuClock:
    """CPU seconds (user + system) of a side's processes (its process and every descendant) and of the
    Prefect server the flow reports to (the process listening on the API's port), read every 0.1 s: on a
    machine of few cores, the server's work for each task run and artifact competes with the campaign's."""

    def __init__(self, pid: int, api: str | None):
        self.side = psutil.Process(pid)
        self.server = _listener(api) if api else None
        self.samples: list[tuple[float, float, float]] = []  # (time, side cpu, server cpu)

    @staticmethod
    def _cpu(proc) -> float:
        total = 0.0
        try:
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return float("nan")
        for each in procs:
            with contextlib.suppress(psutil.Error):
                times = each.cpu_times()
                total += times.user + times.system
        return total

    def run_until_exit(self, child: subprocess.Popen) -> str:
        errors: list[str] = []
        reader = threading.Thread(target=lambda: errors.append(child.stderr.read()), daemon=True)
        reader.start()
        while child.poll() is None:
            server = self._cpu(self.server) if self.server is not None else float("nan")
            self.samples.append((time.time(), self._cpu(self.side), server))
            time.sleep(0.1)
        reader.join()
        return "".join(errors)

    def per_step(self, marks: list[float]) -> dict[str, float]:
        """CPU seconds per step between the first and the last of `marks` (the samples nearest to them)."""
        if len(marks) < 2 or not self.samples:
            return {}

        def at(t: float) -> tuple[float, float, float]:
            return min(self.samples, key=lambda sample: abs(sample[0] - t))

        (_, side0, server0), (_, side1, server1) = at(marks[0]), at(marks[-1])
        steps = len(marks) - 1
        return {"cpu_side": (side1 - side0) / steps, "cpu_server": (server1 - server0) / steps}


def _listener(api: str):
    """The process listening on the API URL's port (None when it is not on this machine)."""
    port = urlparse(api).port
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    return None


def summary(results: list[dict]) -> dict:
    """The median step over every run of a side (each run's first step left out); response length and
    reward from the runs that finished."""
    done = [r for r in results if r and r.get("step_s")]
    if not done:
        return {}
    tails = [statistics.fmean(r["reward"][-5:]) for r in done]
    return {
        "s_step": statistics.median(x for r in done for x in r["step_s"]),
        # the fastest step: the nearest to an idle machine when others share it
        "best": min(x for r in done for x in r["step_s"]),
        "response_len": statistics.fmean(x for r in done for x in r["response_len"]),
        "reward_last5": statistics.fmean(tails),
        "runs": len(done),
        "cpu_side": statistics.fmean(r.get("cpu_side", float("nan")) for r in done),
        "cpu_server": statistics.fmean(r.get("cpu_server", float("nan")) for r in done),
    }


def print_table(rows: list[tuple[str, str, dict]]) -> None:
    print()
    print(
        "| work | side | s/step (median, first left out) | ratio to TRL | goal | fastest step s | ratio | "
        "mean response tokens | reward, last 5 steps | CPU s/step: side | CPU s/step: Prefect server |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    trl = {w: s for w, side, s in rows if side == "trl" and s}
    for work, side, s in rows:
        if not s:
            print(f"| {work} | {side} | failed | | | | | | | | |")
            continue
        ratio = trl[work]["s_step"] / s["s_step"] if work in trl else float("nan")
        goal = GOALS.get((work, side))
        verdict = "" if goal is None else f">= {goal:g}x: {'met' if ratio >= goal else 'NOT met'}"
        best = trl[work]["best"] / s["best"] if work in trl else float("nan")
        print(
            f"| {work} | {side} | {s['s_step']:.3f} | {ratio:.2f} | {verdict} | {s['best']:.3f} | {best:.2f} | "
            f"{s['response_len']:.1f} | {s['reward_last5']:.3f} | {s['cpu_side']:.3f} | "
            + ("" if side_spec(side)[0] not in ("flow", "async") else f"{s['cpu_server']:.3f}")
            + " |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", nargs="*", choices=list(WORKS), default=list(WORKS))
    parser.add_argument(
        "--steps", type=int, default=8, help="steps (rollout ids) per side and work; at least 2"
    )
    parser.add_argument(
        "--sides",
        nargs="*",
        default=["trl", "flow", "plain"],
        help="of trl, flow, plain, async; a slime-wf side may add config overrides: plain@section.key=value,...",
    )
    parser.add_argument(
        "--plain-all", action="store_true", help="also run the plain loop on the 12m and 1m works"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every side this many times, in alternating order (on a shared machine the load moves)",
    )
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (models, run stores, logs)")
    parser.add_argument("--_side", help=argparse.SUPPRESS)
    parser.add_argument("--_root", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    parser.add_argument("--_assets", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.steps < 2:
        parser.error("--steps must be at least 2: the first step is left out")
    try:
        bases = {side_spec(side)[0] for side in ns.sides}
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))

    if ns._side:  # a child: one side of one work
        work, root, assets = WORKS[ns.work[0]], Path(ns._root), json.loads(ns._assets)
        if ns._side == "trl":
            result = run_trl(work, assets, root, ns.steps, ns.seed)
        else:
            result = run_slime(ns._side, work, assets, root, ns.steps, ns.seed)
        Path(ns._out).write_text(json.dumps(result))
        return 0

    with contextlib.ExitStack() as stack:
        root = (
            Path(ns.keep)
            if ns.keep
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vs-trl-")))
        )
        root = root.absolute()
        root.mkdir(parents=True, exist_ok=True)
        api = stack.enter_context(prefect_api(root / "prefect", bool({"flow", "async"} & bases)))
        rows = []
        for name in ns.work:
            work = WORKS[name]
            assets = make_assets(work, root / "assets" / name)
            print(
                f"{name}: {parameter_count(assets['model']) / 1e6:.2f}M parameters, {asdict(work)}",
                flush=True,
            )
            sides = [s for s in ns.sides if side_spec(s)[0] != "plain" or name == "tiny-math" or ns.plain_all]
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            for repeat in range(ns.repeat):
                # alternate the order, so that no side always meets the machine's quieter moments
                for side in sides if repeat % 2 == 0 else sides[::-1]:
                    result = run_side(side, work, assets, root, ns.steps, ns.seed, api)
                    runs[side].append(result)
                    if result:
                        print(
                            f"  {side}: steps {[round(x, 3) for x in result['step_s']]} s, "
                            f"response {statistics.fmean(result['response_len']):.1f} tokens, "
                            f"total {result['total_s']:.0f} s",
                            flush=True,
                        )
            for side in sides:
                rows.append((name, side, summary(runs[side])))
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
