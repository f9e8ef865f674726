"""The trainer as a service: in the caller's process for one rank, under torchrun for more.

    trainer = make_trainer(cfg.args(), hf_dir, nproc_per_node=2)   # LocalTrainer or RemoteTrainer
    metrics = trainer.train(samples, rollout_id=0)
    trainer.save(path, rollout_id=0); trainer.export_hf(out_dir)
    trainer.restart(from_checkpoint=path)    # after a failure
    trainer.shutdown()

`RemoteTrainer` launches `torchrun --standalone --nproc-per-node N -m slime_wf.training.service`
(many nodes: see `trainer_group`). Rank 0 reads the trainer's settings and sends them, with the
HF checkpoint's path, to the other ranks over the process group, so ranks on other nodes need no
file from this one; every rank checks that the paths the trainer reads exist on its node. Rank 0
listens on 127.0.0.1 (a `multiprocessing.connection.Listener`, HMAC-authenticated with a
key passed through the environment) and takes one command at a time from the client: a JSON
object framed by the connection's length prefix, never a pickle. Samples travel as a JSONL file
whose path is in the command; rank 0 reads it and broadcasts its text. Rank 0 broadcasts each command to the other ranks, every rank
runs it on its `Trainer`, and rank 0 answers `{"ok": true, "result": ...}` or `{"ok": false,
"error": ...}`. While idle, rank 0 broadcasts a heartbeat now and then, so the other ranks'
wait never reaches the process group's timeout.

A rank that dies takes the whole torchrun group down (torchrun's default); the client sees the
exit (or the connection close) and raises `TrainerServiceError` with torchrun's exit code and
the end of the service log. `restart(from_checkpoint=...)` starts a fresh group from a
checkpoint. If the client process dies, rank 0 notices and exits, so no service is orphaned.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from multiprocessing.connection import Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slime_wf.training.trainer_client import (
    AUTHKEY_ENV,
    LocalTrainer,
    RemoteTrainer,
    TrainerServiceError,
    make_trainer,
    trainer_status,
)
from slime_wf.types import Sample, parse_samples_jsonl

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from slime_wf.training.trainer import Trainer

__all__ = ["LocalTrainer", "RemoteTrainer", "TrainerServiceError", "make_trainer", "serve"]

logger = logging.getLogger(__name__)


# ---- the service (every rank of the torchrun group) ---------------------------------------


def _run_command(trainer: Trainer, command: dict[str, Any]) -> Any:
    name = command["cmd"]
    if name == "train":
        samples: list[Sample | dict[str, Any]] = list(
            parse_samples_jsonl(command["samples_text"], command["samples_path"])
        )
        return trainer.train(samples, command["rollout_id"])
    if name == "save":
        return trainer.save(command["path"], command.get("rollout_id"))
    if name == "load":
        return trainer.load(command["path"])
    if name == "export_hf":
        return trainer.export_hf(command["out_dir"], command.get("dtype"))
    if name == "ping":
        return trainer_status(trainer)
    if name == "broadcast_weights":
        return trainer.broadcast_weights(command["plan"], command["request"])
    if name == "close_weight_group":
        return trainer.close_weight_group()
    raise ValueError(
        f"unknown trainer command {name!r}; known: train, save, load, export_hf, ping, broadcast_weights, "
        "close_weight_group, shutdown"
    )


def _watch_client(client_pid: int) -> None:
    """Exit rank 0 (and so the group) when the client process is gone."""
    while True:
        time.sleep(2.0)
        try:
            os.kill(client_pid, 0)
        except ProcessLookupError:
            logger.error("client process %d is gone: stopping the trainer service", client_pid)
            os._exit(3)
        except PermissionError:
            pass


def _send(conn: Connection[Any, Any], message: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(message, default=str).encode())


def _where() -> str:
    return (
        f"trainer node {os.environ.get('GROUP_RANK', '0')} ({socket.gethostname()}), "
        f"rank {os.environ.get('RANK', '0')}"
    )


def _paths_seen_by_rank0(args: dict[str, Any], hf_checkpoint: str) -> dict[str, str]:
    """The paths the trainer reads that exist on rank 0's node; every rank must see them too."""
    from slime_wf.training.checkpointing import find_checkpoint

    paths = {"hf_checkpoint": hf_checkpoint}
    for key in ("load", "ref_load", "critic_load"):
        if args.get(key) and os.path.exists(args[key]):
            paths[key] = args[key]
    resume = find_checkpoint(args.get("load"))
    if (
        resume is not None
    ):  # a folder of checkpoints resolves to its latest one, which must be the same everywhere
        paths["the checkpoint resumed from (load)"] = str(resume / "trainer_state.json")
    return paths


def _missing_here(paths: dict[str, str]) -> str | None:
    missing = [f"{key} {path}" for key, path in paths.items() if not os.path.exists(path)]
    if not missing:
        return None
    return (
        f"{_where()}: not found here: {', '.join(missing)}. Every trainer node reads these at the same path: "
        "put them on a filesystem the trainer nodes share, or copy them to that path on each node"
    )


def _agree(dist, error: str | None) -> str | None:
    """Every rank's error, gathered (a collective: every rank gets the same answer)."""
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [f"[rank {r}] {e}" for r, e in enumerate(errors) if e is not None]
    return "\n".join(failed) or None


def _check_shared(dist, folder: Path) -> None:
    """Every rank writes its part of a checkpoint into one folder: on several nodes it must be one folder
    (a shared filesystem), or the checkpoint would be split between the nodes' disks."""
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) == 1:
        return
    probe = folder / f".slime-wf-shared-{os.environ.get('TORCHELASTIC_RUN_ID', 'probe')}"
    unwritable = None
    if dist.get_rank() == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.touch()
        except OSError as err:
            unwritable = f"{_where()}: cannot write the checkpoint folder {folder}: {err}"
    dist.barrier()
    unseen = unwritable or (
        None
        if probe.exists()
        else (
            f"{_where()}: the checkpoint folder {folder} that rank 0 writes to is not visible here. Every rank writes its "
            "part of a checkpoint there: put the run store (or storage.scratch_dir, for an s3:// store) on a filesystem "
            "the trainer nodes share"
        )
    )
    unseen = _agree(dist, unseen)
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    if unseen:
        raise RuntimeError(unseen)


def _nonfinite_detail(err: BaseException) -> dict[str, Any] | None:
    from slime_wf.training.nonfinite import NonFiniteTrainingError

    if not isinstance(err, NonFiniteTrainingError):
        return None
    return {
        "message": str(err),
        "rollout_id": err.rollout_id,
        "skips": err.skips,
        "consecutive": err.consecutive,
        "applied_steps": err.applied_steps,
    }


def serve(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from slime_wf.training.parallel import init_process_group

    parser = argparse.ArgumentParser(
        description="slime-wf trainer service (run under torchrun); the options are "
        "rank 0's, the other ranks get the settings from it"
    )
    parser.add_argument("--args-json")
    parser.add_argument("--hf-checkpoint")
    parser.add_argument("--address-file")
    parser.add_argument("--client-pid", type=int)
    parser.add_argument("--heartbeat-s", type=float, default=60.0)
    opts = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s")
    authkey = os.environ.pop(AUTHKEY_ENV, None)

    conn: Connection[Any, Any] | None = None
    if rank == 0:
        if authkey is None or None in (
            opts.args_json,
            opts.hf_checkpoint,
            opts.address_file,
            opts.client_pid,
        ):
            parser.error(
                f"rank 0 needs --args-json, --hf-checkpoint, --address-file, --client-pid and {AUTHKEY_ENV} "
                "(RemoteTrainer starts it so); the other nodes join with `slime-wf trainer-node`"
            )
        threading.Thread(target=_watch_client, args=(opts.client_pid,), daemon=True).start()
        listener = Listener(("127.0.0.1", 0), authkey=bytes.fromhex(authkey))
        host, port = listener.address
        tmp = Path(opts.address_file + ".tmp")
        tmp.write_text(json.dumps({"host": host, "port": port}))
        tmp.rename(opts.address_file)
        conn = listener.accept()
        listener.close()

    from slime_wf.training.trainer import Trainer

    try:
        init_process_group()
        box: list[Any] = [None]
        if rank == 0:
            args = json.loads(Path(opts.args_json).read_text())
            box = [(args, opts.hf_checkpoint, _paths_seen_by_rank0(args, opts.hf_checkpoint))]
        dist.broadcast_object_list(box, src=0)
        args, hf_checkpoint, paths = box[0]
        missing = _agree(dist, _missing_here(paths))
        if missing:
            raise FileNotFoundError(missing)
        trainer = Trainer(args, hf_checkpoint)
    except Exception:
        if conn is not None:
            _send(conn, {"ok": False, "error": traceback.format_exc()})
        raise
    pids: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    if conn is not None:
        ready = {
            "pids": pids,
            **trainer_status(trainer),
            "initial_weights": dataclasses.asdict(trainer.initial_weights),
        }
        _send(conn, {"ok": True, "result": ready})

    heartbeats = 0
    try:
        while True:
            command: dict[str, Any] | None = None
            if conn is not None:
                try:
                    command = (
                        json.loads(conn.recv_bytes()) if conn.poll(opts.heartbeat_s) else {"cmd": "heartbeat"}
                    )
                except (EOFError, OSError):
                    command = {"cmd": "shutdown"}  # the client is gone
                if command["cmd"] == "train":  # the file is on this node only
                    try:
                        command["samples_text"] = Path(command["samples_path"]).read_text(encoding="utf-8")
                    except OSError as err:
                        command["samples_text"] = None
                        command["error"] = f"cannot read the samples: {err}"
            # The engines' admin key is for rank 0 alone (it makes the HTTP calls): it never
            # travels over the trainer's network to the other ranks.
            secret = None
            if command is not None and command.get("cmd") == "broadcast_weights":
                secret = command.get("plan", {}).pop("api_key", None)
            box = [command]
            dist.broadcast_object_list(box, src=0)
            command = box[0]
            if secret is not None:
                command["plan"]["api_key"] = secret
            if command["cmd"] == "heartbeat":
                heartbeats += 1
                if (
                    rank == 0
                ):  # a line per heartbeat_s of idling: the group is alive while the campaign generates
                    logger.info("idle: heartbeat %d, every rank in step", heartbeats)
                continue
            if command["cmd"] == "shutdown":
                if conn is not None:
                    try:
                        _send(conn, {"ok": True, "result": None})
                    except OSError:
                        pass
                return 0
            nonfinite = None
            try:
                if command.get("error"):
                    raise RuntimeError(command["error"])
                if command["cmd"] == "save":
                    _check_shared(dist, Path(command["path"]).parent)
                result, error = _run_command(trainer, command), None
            except Exception as err:
                result, error, nonfinite = None, traceback.format_exc(), _nonfinite_detail(err)
            failed = _agree(dist, error)
            if conn is not None:
                if failed:
                    _send(conn, {"ok": False, "error": failed, "nonfinite": nonfinite})
                else:
                    _send(conn, {"ok": True, "result": result})
    finally:
        trainer.shutdown()
        if conn is not None:
            conn.close()


if __name__ == "__main__":
    sys.exit(serve())
