"""Checkpoints: getting them onto local disk and turning BF16 weights into FP8.

- `download.resolve_checkpoint(source, cache_dir)`: a Hugging Face hub repo id, an `s3://` prefix
  or a local folder, returned as a local folder (`s3_download`: parallel, resumable, verified).
- `fp8`: the FP8 weight format SGLang loads (block, per-channel, per-tensor scales): quantize and
  dequantize one tensor, decide which tensors stay in high precision, and turn a loaded FP8
  checkpoint back into plain weights.
- `fp8_convert.convert_checkpoint(model_dir, save_dir)`: a whole Hugging Face checkpoint to FP8,
  streamed tensor by tensor and parallel across shards.
- `fp8_format.Fp8Format`: the FP8 layout of the checkpoint the engines serve (a published one's
  own block size, scale names and kept modules), which every weight sync reproduces.
- `layout`: what a folder holds (HF checkpoint, FP8 or not; trainer checkpoint; slime's
  Megatron-LM torch_dist checkpoint, which is refused with the way out), and its `config.json`.
- `dtypes.torch_dtype`: a dtype from its name, as settings, HF configs and SGLang spell it.

Submodules are imported on demand, so that a download does not pay for importing torch.
"""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resolved; the message names the source and what to do."""
