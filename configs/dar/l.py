"""D-AR-L (GPT-L over the 256 ids of tokenizer v1), official FID sampling settings
(cfg "1.2,8.0" linear over positions, top-k 0, top-p 1.0, temperature 1.0, batch 64).

Official weights, converted once (showlab/D-AR on Hugging Face):
  disa-convert dar-tokenizer --torch-checkpoint D-AR-tokenizer_v1.pt --out ckpt/dar_tokenizer
  disa-convert dar --torch-checkpoint D-AR-L-360K.pt --out ckpt/dar_l
  disa-sample --config=configs/dar/l.py --checkpoint=ckpt/dar_l \
      --tokenizer-checkpoint=ckpt/dar_tokenizer --out=outputs/dar_l
Demo setting: --cfg=4.0; streaming previews (a strip per image): --previews; layout control:
--layout-from=IMAGE --prefix-groups=2, or --prefix-from-sample --prefix-groups=2.
Speed knobs (off by default): --num-tokens=192 (early stop), --decoder-steps=4 (coarser grid).
  disa-bench --config=configs/dar/l.py:cpu --batch-size=4 --runs=full,stop=192,grid=4
  disa-eval --config=configs/dar/l.py --checkpoint=ckpt/dar_l \
      --tokenizer-checkpoint=ckpt/dar_tokenizer --inception=ckpt/inc --ref-stats=REF.npz
CPU-sized stand-in with random weights (256 ids in 8 groups, 256x256, toy widths):
  --config=configs/dar/l.py:cpu        Unit-test size (16 ids, 64x64): --config=configs/dar/l.py:tiny
"""

from disa_jax.config import parse_arg
from disa_jax.systems.dar.config import dar_config


def get_config(arg=None):
  a = parse_arg(arg, cpu=False, tiny=False)
  return dar_config('l', cpu=a.cpu, tiny=a.tiny)
