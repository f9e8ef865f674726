"""The trainer as a service: in the caller's process for one rank, under torchrun for more.

    trainer = make_trainer(cfg.args(), hf_dir, nproc_per_node=2)   # LocalTrainer or RemoteTrainer
    metrics = trainer.train(samples, rollout_id=0)
    trainer.save(path, rollout_id=0); trainer.export_hf(out_dir)
    trainer.restart(from_checkpoint=path)    # after a failure
    trainer.shutdown()

`RemoteTrainer` launches `torchrun --standalone --nproc-per-node N -m slime_wf.training.service`.
Rank 0 listens on 127.0.0.1 (a `multiprocessing.connection.Listener`, HMAC-authenticated with a
key passed through the environment) and takes one command at a time from the client: a JSON
object framed by the connection's length prefix, never a pickle. Samples travel as a JSONL file
whose path is in the command. Rank 0 broadcasts each command to the other ranks, every rank
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
import json
import logging
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

from slime_wf.training.trainer_client import (
    AUTHKEY_ENV,
    LocalTrainer,
    RemoteTrainer,
    TrainerServiceError,
    make_trainer,
    read_samples_jsonl,
    write_samples_jsonl,
)

__all__ = [
    "LocalTrainer",
    "RemoteTrainer",
    "TrainerServiceError",
    "make_trainer",
    "read_samples_jsonl",
    "serve",
    "write_samples_jsonl",
]

logger = logging.getLogger(__name__)


# ---- the service (every rank of the torchrun group) ---------------------------------------


def _run_command(trainer, command: dict[str, Any]) -> Any:
    name = command["cmd"]
    if name == "train":
        return trainer.train(read_samples_jsonl(command["samples_path"]), command["rollout_id"])
    if name == "save":
        return trainer.save(command["path"], command.get("rollout_id"))
    if name == "load":
        return trainer.load(command["path"])
    if name == "export_hf":
        return trainer.export_hf(command["out_dir"], command.get("dtype"))
    if name == "ping":
        return {"step": trainer.step, "rollout_id": trainer.rollout_id}
    raise ValueError(f"unknown trainer command {name!r}; known: train, save, load, export_hf, ping, shutdown")


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


def _send(conn, message: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(message, default=str).encode())


def serve(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    parser = argparse.ArgumentParser(description="slime-wf trainer service (run under torchrun)")
    parser.add_argument("--args-json", required=True)
    parser.add_argument("--hf-checkpoint", required=True)
    parser.add_argument("--address-file", required=True)
    parser.add_argument("--client-pid", type=int, required=True)
    parser.add_argument("--heartbeat-s", type=float, default=60.0)
    opts = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s")
    authkey = bytes.fromhex(os.environ.pop(AUTHKEY_ENV))
    args = json.loads(Path(opts.args_json).read_text())

    conn = None
    if rank == 0:
        threading.Thread(target=_watch_client, args=(opts.client_pid,), daemon=True).start()
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        host, port = listener.address
        tmp = Path(opts.address_file + ".tmp")
        tmp.write_text(json.dumps({"host": host, "port": port}))
        tmp.rename(opts.address_file)
        conn = listener.accept()
        listener.close()

    from slime_wf.training.trainer import Trainer

    try:
        trainer = Trainer(args, opts.hf_checkpoint)
    except Exception:
        if conn is not None:
            _send(conn, {"ok": False, "error": traceback.format_exc()})
        raise
    pids: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    if conn is not None:
        _send(conn, {"ok": True, "result": {"pids": pids, "step": trainer.step, "rollout_id": trainer.rollout_id}})

    try:
        while True:
            command = None
            if conn is not None:
                try:
                    command = json.loads(conn.recv_bytes()) if conn.poll(opts.heartbeat_s) else {"cmd": "heartbeat"}
                except (EOFError, OSError):
                    command = {"cmd": "shutdown"}  # the client is gone
            box = [command]
            dist.broadcast_object_list(box, src=0)
            command = box[0]
            if command["cmd"] == "heartbeat":
                continue
            if command["cmd"] == "shutdown":
                if conn is not None:
                    try:
                        _send(conn, {"ok": True, "result": None})
                    except OSError:
                        pass
                return 0
            try:
                result, error = _run_command(trainer, command), None
            except Exception:
                result, error = None, traceback.format_exc()
            errors: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            if conn is not None:
                failed = {r: e for r, e in enumerate(errors) if e is not None}
                if failed:
                    text = "\n".join(f"[rank {r}] {e}" for r, e in failed.items())
                    _send(conn, {"ok": False, "error": text})
                else:
                    _send(conn, {"ok": True, "result": result})
    finally:
        trainer.shutdown()
        if conn is not None:
            conn.close()


if __name__ == "__main__":
    sys.exit(serve())
