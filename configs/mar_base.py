"""Forwards to configs/mar/base.py (the MAR-B (208M) config); kept so older commands work.

  disa-sample --config=configs/mar_base.py:cpu --out=outputs/mar_base_cpu
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
  'configs_mar_base', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mar', 'base.py'))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
get_config = _module.get_config
