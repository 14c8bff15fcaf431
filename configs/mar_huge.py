"""Forwards to configs/mar/huge.py (the MAR-H (943M) config); kept so older commands work.

  disa-sample --config=configs/mar_huge.py:cpu --out=outputs/mar_huge_cpu
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
  'configs_mar_huge', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mar', 'huge.py'))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
get_config = _module.get_config
