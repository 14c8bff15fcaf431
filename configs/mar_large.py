"""Forwards to configs/mar/large.py (the MAR-L (479M) config); kept so older commands work.

  disa-sample --config=configs/mar_large.py:cpu --out=outputs/mar_large_cpu
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
  'configs_mar_large', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mar', 'large.py'))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
get_config = _module.get_config
