"""slime's plugin-facing modules, backed by slime-wf: this package is what `import slime` gives a plugin.

Plugin files written for slime run unchanged: `slime_wf.plugins` installs an import alias (when slime
itself is not installed) under which `slime.X` is `slime_wf.compat.X`, the same module object. The
layout follows slime's, one module per module a plugin imports:

- `utils.types`: `Sample` (slime_wf.types.Sample itself, so `isinstance` holds both ways);
- `utils.http_utils`: `post` / `get`; requests to the campaign's router address go through the
  rollout's engine session (every engine, its API key, its restarts);
- `utils.misc` (`load_function`, `SingletonMeta`), `utils.mask_utils`, `utils.processing_utils`;
- `rollout.sglang_rollout`: `GenerateState`, `generate`, `generate_and_rm`, `generate_and_rm_group`,
  `eval_rollout`, `abort`, bound to the rollout in progress (its engines, tokenizer, abort flag);
- `rollout.rm_hub`, `rollout.filter_hub`, `rollout.data_source`, `rollout.base_types`;
- `utils.async_utils.run`: a custom rollout function's coroutines, run on the rollout's event loop.

What a plugin can import that is not here (slime's Ray, Megatron backends, multimodal processors)
fails as a missing module; the README's "Coming from slime" says what and why.
"""
