"""Forwards to configs/mar/digits.py (the bundled digits model); kept so older commands work.

  disa-sample --config=configs/digits.py --num-images=20 --out=outputs/digits
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
  'configs_mar_digits', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mar', 'digits.py'))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
get_config = _module.get_config
