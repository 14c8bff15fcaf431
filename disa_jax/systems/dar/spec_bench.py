"""Speculative decoding cost model at real GPT shapes: measured phase times, predicted speedup.

  python -m disa_jax.systems.dar.spec_bench                       # GPT-L target, batch 4
  python -m disa_jax.systems.dar.spec_bench --gpt=xl --drafts=l,b --k=2,4
  python -m disa_jax.systems.dar.spec_bench --small               # toy widths (smoke test)

Random weights cannot say how often a draft is accepted (that needs the published weights), so
this measures what does not depend on it, each jitted function warm, one process, side by side:
  t_step      one plain target step (the loop `speculative.py` replaces), 2B rows with CFG
  t_verify(K) one target pass over K ids (a speculative round's check)
  t_draft(K)  one draft round: K one-id steps of the draft GPT (its own CFG rows)
and predicts the GPT speedup of the speculative part for per-id acceptance rates a:
  ids per round  ragged (default): E = sum_{i<K} a^i, each row advancing by its own accepted
                 run (the batch ends with its slowest row, so this is slightly optimistic);
                 lockstep (`ragged=False`): E = sum_{i<K} a^(i B), the batch stopping at its
                 first rejection (a^(i B): all B rows accepted i drafts)
  speedup        E t_step / (t_draft(K) + t_verify(K))
Prints one JSON object (times in seconds, `predicted_speedup[rule][draft][K][a]`).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

ACCEPTANCE = (0.5, 0.7, 0.8, 0.9, 0.95, 1.0)


def ids_per_round(a: float, k: int, batch: int) -> float:
  """Expected ids a round decides when each row accepts each draft with probability a."""
  return float(sum(a ** (i * batch) for i in range(k)))


def _gpt(arch: dict, seed: int):
  from flax import nnx

  from disa_jax.systems.dar.gpt import GPT, GPTConfig
  from disa_jax.systems.dar.sampling import Sampler

  return Sampler(GPT(GPTConfig(**arch), rngs=nnx.Rngs(seed)))


def _timed(fn, repeats: int):
  """(first call seconds, best of `repeats` warm calls) of fn() -> array."""
  import jax

  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return first, best


def run(gpt='l', drafts=('toy', 'b'), ks=(2, 4, 8), batch=4, cfg='1.2,8.0', small=False,
        repeats=3, position=128) -> dict:
  import jax
  import jax.numpy as jnp

  from disa_jax.systems.dar.config import DRAFT_SIZES
  from disa_jax.systems.dar.sampling import cfg_schedule
  from disa_jax.systems.dar.speculative import SpeculativeSampler

  arch = dict(DRAFT_SIZES['toy'] if small else DRAFT_SIZES[gpt])
  target = _gpt(arch, 0)
  L, v = target.gpt_cfg.block_size, target.gpt_cfg.vocab_size
  scales, on = cfg_schedule(cfg, L)
  rows = 2 * batch if on else batch
  stat = dict(on=on, batch=batch, temperature=1.0, top_k=0, top_p=1.0)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, v, batch), jnp.int32)
  u = jnp.asarray(rng.random((batch, 16)), jnp.float32)
  at = jnp.full((batch,), position, jnp.int32)
  out = {'target': gpt if not small else 'toy', 'target_arch': arch, 'batch': batch,
         'cfg': cfg, 'rows': rows, 'position': position, 'backend': jax.default_backend(),
         'repeats': repeats, 'acceptance_rates': list(ACCEPTANCE)}
  state = {'cache': target.gpt_empty_cache(rows)}

  def step():
    new, state['cache'] = target._step(target.state, ids, jnp.int32(position), state['cache'],
                                       jnp.float32(scales[position]), u[:, 0], **stat)
    return new

  out['t_step_first'], out['t_step'] = _timed(step, repeats)
  out['t_verify'], out['t_draft'], out['predicted_speedup'] = {}, {}, {}
  draft_models = {name: _gpt(dict(DRAFT_SIZES[name] if not small else DRAFT_SIZES['toy']),
                             1) for name in drafts}
  for k in ks:
    spec = SpeculativeSampler(target, target, draft_tokens=k, start=1)
    cache = {'t': spec._cache(target, rows)}
    toks = jnp.asarray(rng.integers(0, v, (batch, k)), jnp.int32)
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(batch, k, v)), jnp.float32), axis=-1)
    sc = jnp.broadcast_to(jnp.asarray(scales[position:position + k]), (batch, k))

    def verify(spec=spec, cache=cache, toks=toks, q=q, sc=sc, k=k):
      res = spec._target_round(target.state, toks, at, cache['t'], sc, toks, q, u[:, :k],
                               u[:, :k], **stat)
      cache['t'] = res[3]
      return res[0]

    first, best = _timed(verify, repeats)
    out['t_verify'][k] = {'first': first, 'warm': best}
    for name, draft in draft_models.items():
      dspec = SpeculativeSampler(target, draft, draft_tokens=k, start=1)
      dcache = {'d': dspec._cache(draft, rows)}

      def draft_round(dspec=dspec, dcache=dcache, k=k, draft=draft, sc=sc):
        d, _, dcache['d'] = dspec._draft_round(draft.state, ids, at, dcache['d'], sc,
                                               u[:, :k], **stat)
        return d

      first, best = _timed(draft_round, repeats)
      out['t_draft'].setdefault(name, {})[k] = {'first': first, 'warm': best}
      cost = best + out['t_verify'][k]['warm']
      for rule, rows_b in (('ragged', 1), ('lockstep', batch)):
        out['predicted_speedup'].setdefault(rule, {}).setdefault(name, {})[k] = {
          str(a): round(ids_per_round(a, k, rows_b) * out['t_step'] / cost, 3)
          for a in ACCEPTANCE}
  out['draft_archs'] = {name: DRAFT_SIZES[name] for name in drafts}
  out['break_even'] = {
    rule: {name: {k: next((a for a in ACCEPTANCE if float(s[str(a)]) >= 1.0), None)
                  for k, s in per_k.items()} for name, per_k in per_rule.items()}
    for rule, per_rule in out['predicted_speedup'].items()}
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--gpt', default='l', choices=['l', 'xl'])
  p.add_argument('--drafts', default='toy,b', help='draft sizes (config.DRAFT_SIZES)')
  p.add_argument('--k', default='2,4,8', help='draft lengths K')
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--cfg', default='1.2,8.0')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--small', action='store_true', help='toy widths (smoke test)')
  a = p.parse_args(argv)
  from disa_jax.systems.dar.config import DRAFT_SIZES

  unknown = sorted(set(a.drafts.split(',')) - set(DRAFT_SIZES))
  if unknown:
    p.error(f'unknown draft size(s) {", ".join(unknown)}; choose from '
            f'{", ".join(sorted(DRAFT_SIZES))}')
  res = run(gpt=a.gpt, drafts=tuple(a.drafts.split(',')),
            ks=tuple(int(x) for x in a.k.split(',')), batch=a.batch, cfg=a.cfg,
            small=a.small, repeats=a.repeats)
  print(json.dumps(res, indent=1, default=str))


if __name__ == '__main__':
  main()
