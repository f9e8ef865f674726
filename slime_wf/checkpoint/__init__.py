"""Checkpoints: getting them onto local disk and turning BF16 weights into FP8.

- `download.resolve_checkpoint(source, cache_dir)`: a Hugging Face hub repo id, an `s3://` prefix
  or a local folder, returned as a local folder (`s3_download`: parallel, resumable, verified).
- `fp8`: the FP8 weight format SGLang loads (block, per-channel, per-tensor scales): quantize and
  dequantize one tensor, decide which tensors stay in high precision, and turn a loaded FP8
  checkpoint back into plain weights.
- `fp8_convert.convert_checkpoint(model_dir, save_dir)`: a whole Hugging Face checkpoint to FP8,
  streamed tensor by tensor and parallel across shards.

Submodules are imported on demand, so that a download does not pay for importing torch.
"""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resolved; the message names the source and what to do."""
