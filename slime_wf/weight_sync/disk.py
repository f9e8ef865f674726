"""Weight sync in `disk` mode: trainer weights -> HF checkpoint on disk (cast to FP8 when the rollout
runs in FP8) -> every engine loads it with `/update_weights_from_disk`.

The FP8 cast produces the layout the engines were started with (`checkpoint.fp8_format.Fp8Format`): a
published FP8 checkpoint's own block size, scale names and kept modules, or those of slime-wf's FP8
copy; each export is checked against that layout before any engine loads it.

The trainer writes a complete HF checkpoint into the scratch folder, then every engine loads it, tagged
with `weight_version` = the rollout id. Engines swap weights between decode steps; each response
reports the versions that produced its tokens, and the rollout records them in `Sample.weight_versions`.
It needs a filesystem that the trainer's rank 0 and every engine host share (`storage.scratch_dir`);
the fleet records each export, so that a restarted engine loads the newest weights.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from typing import Any

from slime_wf.checkpoint import CheckpointError
from slime_wf.checkpoint.fp8_format import Fp8Format
from slime_wf.weight_sync.verify import verify_served_weights

logger = logging.getLogger(__name__)


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def export_weights(trainer: Any, out_dir: str, *, fp8: Fp8Format | dict[str, Any] | None = None) -> str:
    """Write the trainer's current weights as an HF checkpoint at `out_dir`.

    With `fp8` (an `Fp8Format`, or {"strategy", "block_size"} for slime-wf's own layout), the weights
    are cast by the quantizer that makes FP8 checkpoints, into that layout, and the result is checked
    against it, so the engines receive the format they serve.
    """
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    if fp8 is None:
        return trainer.export_hf(out_dir)
    from slime_wf.checkpoint.fp8_convert import ConversionError, convert_checkpoint

    fmt = fp8 if isinstance(fp8, Fp8Format) else Fp8Format.from_settings(fp8["strategy"], fp8["block_size"])
    staging = out_dir.rstrip("/") + ".bf16"
    if os.path.exists(staging):
        shutil.rmtree(staging)
    trainer.export_hf(staging)
    try:
        convert_checkpoint(staging, out_dir, fmt=fmt, progress=False)
    except ConversionError as err:
        raise CheckpointError(f"weight export to {out_dir} in {fmt.describe()}: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fmt.check_export(out_dir)
    return out_dir


async def push_weights(session: Any, model_path: str, weight_version: str) -> list[dict[str, Any]]:
    """`/update_weights_from_disk` on every engine; raises naming each engine that refused."""

    async def one(client):
        return client.url, await client.update_weights_from_disk(
            model_path, str(weight_version), flush_cache=True
        )

    results = await session.for_each_engine(one, skip_down=False)
    failed = [(url, r) for url, r in results if not (isinstance(r, dict) and r.get("success"))]
    if failed:
        details = "; ".join(f"{url}: {r.get('message') if isinstance(r, dict) else r}" for url, r in failed)
        raise CheckpointError(f"weight sync of {model_path} (version {weight_version}) failed on: {details}")
    return [r for _, r in results]


def sync_weights(
    fleet: Any, trainer: Any, out_dir: str, weight_version: str, *, fp8=None, verify=False
) -> dict:
    """Export, push to every engine of `fleet`, and record the new weights for engine restarts."""
    t0 = time.perf_counter()
    export_weights(trainer, out_dir, fp8=fp8)
    t1 = time.perf_counter()

    async def _push():
        async with fleet.session() as session:
            await push_weights(session, out_dir, weight_version)
            if verify:
                return await verify_served_weights(session, out_dir)
            return None

    max_diff = asyncio.run(_push())
    t2 = time.perf_counter()
    fleet.set_weights(out_dir, weight_version)
    nbytes = dir_size(out_dir)
    out = {
        "sync/export_s": t1 - t0,
        "sync/push_s": t2 - t1,
        "sync/bytes": float(nbytes),
        "sync/s_per_gb": (t2 - t0) / max(nbytes / 2**30, 1e-9),
    }
    if max_diff is not None:
        out["sync/max_logprob_diff"] = max_diff
    logger.info("weights %s synced to %d engine(s) in %.2f s", weight_version, len(fleet.urls), t2 - t0)
    return out


def prune_exports(folder: str, keep: int, current: str) -> None:
    """Remove all but the newest `keep` weight exports in `folder` (never `current`)."""
    if not os.path.isdir(folder):
        return
    exports = sorted(
        (os.path.join(folder, d) for d in os.listdir(folder) if not d.startswith(".")),
        key=os.path.getmtime,
    )
    for path in exports[:-keep]:
        if os.path.abspath(path) != os.path.abspath(current):
            shutil.rmtree(path, ignore_errors=True)
