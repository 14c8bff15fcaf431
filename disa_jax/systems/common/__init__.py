"""Code that FlowAR and xAR (both flow-head AR systems over KL-16 latents) share.

  model_dir   save / load a system's model directory (kind, config class, model class)
  config      config-argument parsing, variant names, config-dataclass dicts, the common
              runtime / tokenizer / train / data sections
  bench       the PyTorch reference import, the side-by-side timing loop, table layout, the
              argparse entry of the reference benchmark
"""
