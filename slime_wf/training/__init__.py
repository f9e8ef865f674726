"""Training: the Megatron-core policy model (built from an HF config), HF<->Megatron weights,
distributed checkpoints, and the RL objectives (`objectives/`)."""

import warnings

# megatron-core warns at import time that the optional fused kernels (Apex, Transformer
# Engine) are missing and falls back to plain torch, which is what slime-wf uses on purpose.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* (is|are) not installed", category=UserWarning)
