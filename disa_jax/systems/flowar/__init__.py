"""FlowAR (Ren et al. 2024) + DiSA: next-scale AR with a per-scale flow-matching head.

Public API (see each module's docstring for the math and the official file it matches):
  config       FlowARConfig, VARIANTS, TINY, SamplingSettings, OFFICIAL_SAMPLING, variant(name)
  model        FlowAR (trunk_step, trunk_full, velocity, embed_tokens, class_embedding)
  head         FlowHead (SimpleTransformerAdaLN), HeadSelfBlock (v1), HeadCrossBlock (v2)
  next_scale   next_scale_input, next_scale_matrix, bicubic_matrix, area_matrix
  steps        disa_scale_steps, preset_steps, resolve_scale_steps, PRESETS
  sampling     FlowARSampler (generate / start / step, traces, compile_count),
               FlowARSamplingState, generate, scale_cfg, unpatchify
  convert      convert, convert_state, read_state_dict, infer_config, load_converted,
               FlowARConversionError
  io           save_flowar, load_flowar
  flops        scale_flops, run_flops
  engine       FlowAREngineSampler (the engine's sampler contract), FlowARPlan
  system       the `System` hooks; `SYSTEM` below
"""

from disa_jax.systems.flowar.system import SYSTEM

__all__ = ['SYSTEM']
