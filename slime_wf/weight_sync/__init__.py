"""Weight sync: the trainer's current weights into every engine, cast to the FP8 layout the engines
serve when they serve FP8 (`checkpoint.fp8_format.Fp8Format`), tagged with a weight version.

Two modes (`storage.weight_sync_mode`):

- `disk` (`disk.py`, the default): export an HF checkpoint to `storage.scratch_dir`, then
  `/update_weights_from_disk` on every engine. Needs a filesystem that the trainer's rank 0 and all
  engine hosts share.
- `distributed` (`distributed.py` on the trainer, `fleet_sync.py` for the campaign,
  `slime_wf.weight_group` for the process group both ends build): SGLang's weight-update group.
  Trainer rank 0 hosts a process group with every engine rank (`/init_weights_update_group`, once
  per engine start) and broadcasts the weights bucket by bucket (`/update_weights_from_distributed`
  between `/begin_weight_update` and `/end_weight_update`). NCCL against SGLang on GPUs, gloo
  against the local engine. Needs network reachability from every engine to trainer rank 0
  (`storage.weight_sync_master_address`, `weight_sync_master_port`); no shared filesystem.

`verify.py` is the served-weights check (`check_weight_update_equal`) for both modes: its reference
forward runs the engine server's own model loader (`engine_server.model`) on the weights sent.
"""
