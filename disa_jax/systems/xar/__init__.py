"""xAR (Ren et al. 2025) + DiSA: next-cell AR where the whole transformer is the flow network.

Public API (see each module's docstring for the math and the official file it matches):
  config    XARConfig, VARIANTS, TINY, CPU, SamplingSettings, OFFICIAL_SAMPLING, variant(name),
            xar_config(name, arg)
  model     XAR (forward_cells with KV cache, forward_full, cell_condition), cell_positions,
            cell_order, cell_rope_table, cell_causal_mask, to_raster, cell_block
  steps     disa_cell_steps, preset_steps, resolve_cell_steps, steps_from_config, PRESETS
  sampling  XARSampler (generate / start / step / draws, traces, compile_count),
            XARSamplingState, CellPlan, cell_plan, cell_cfg, first_pass_mask, generate
  convert   convert, convert_state, read_state_dict, infer_config, check_shapes,
            load_converted, XARConversionError
  io        save_xar, load_xar
"""

from disa_jax.systems.xar.system import SYSTEM  # noqa: E402,F401
