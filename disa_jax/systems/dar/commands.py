"""D-AR's bodies of disa-sample, disa-bench and disa-eval (`SYSTEM.commands`).

D-AR's decoder runs during generation (one flow step per completed group of ids), so these
commands drive `system.RunSampler.run` instead of the shared tokens-then-decode loop:

  disa-sample --config=configs/dar/l.py:tiny --num-images=4 --out=outputs/dar_tiny --previews
  disa-sample --config=configs/dar/l.py:tiny --layout-from=ref.png --prefix-groups=2 --out=...
  disa-sample --config=configs/dar/l.py:tiny --prefix-from-sample --prefix-groups=1 --out=...
  disa-bench  --config=configs/dar/l.py:cpu --batch-size=4 --runs=full,stop=192,grid=4
  disa-bench  --config=configs/dar/l.py:cpu --draft=random:toy --runs=full,spec=2,spec=4
  disa-sample --config=configs/dar/xl.py --checkpoint=ckpt/dar_xl --draft=ckpt/dar_l ...
  disa-eval   --config=configs/dar/l.py --checkpoint=ckpt/dar_l \\
      --tokenizer-checkpoint=ckpt/dar_tokenizer --inception=ckpt/inc --ref-stats=REF.npz \\
      --num-images=50000 --batch-size=64 --out=outputs/eval_dar_l

Sample output (atomic, `disa_jax.io.output.OutputDir`): images/NNNNNN.png, previews/NNNNNN.png
(with --previews: the G streaming previews left to right), labels.npy, tokens.npy (ids, with
--save-tokens), grid.png, metrics.json (seconds split GPT / decoder, tokens/s, compiles).
Image i's randomness is fold_in(key(seed), i) (`system.RunSampler.image_randomness`).
The bench's `--runs` lists `full`, `stop=N` (early stop after N ids, the image is the preview of
the last completed group) and `grid=S` (coarser decoder grid of S steps); every run uses the
same images' randomness, and the distance of each run's images to the `full` run's is
reported (mean |diff| in [-1, 1] units and PSNR of the uint8 images). `spec=K` runs speculative
decoding with the `--draft` GPT, K ids drafted per round (`speculative.py`): it keeps the
target's distribution, not its samples (the acceptance tests consume their own draws), so its
distance to `full` is that of another sample; the table adds the acceptance per group.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from disa_jax.errors import UserError

MAR_ONLY = ('preset', 'strategy', 'upper_steps', 'lower_steps', 'steps', 'num_iter',
            'cfg_schedule', 'max_timestep', 'vae')


def _flags():
  from absl import flags

  return flags.FLAGS


def apply_flags(config, *, sampling_flags=True):
  """Shared flags D-AR understands, then D-AR's own; MAR-only flags are refused."""
  from disa_jax.systems.dar import flags as dar_flags

  FLAGS = _flags()
  for name in MAR_ONLY:
    if name in FLAGS and FLAGS[name].present:
      raise UserError(f'--{name} does not apply to D-AR (config.system=dar): it has no per-stage '
                      'solver steps; see --num-tokens / --decoder-steps for its speed knobs')
  with config.unlocked():
    if sampling_flags:
      for name in ('num_images', 'batch_size', 'classes', 'seed', 'temperature'):
        if name in FLAGS and getattr(FLAGS, name) is not None:
          config.sampling[name] = getattr(FLAGS, name)
      if 'cfg' in FLAGS and FLAGS.cfg is not None:
        config.sampling.cfg = repr(float(FLAGS.cfg))
    if 'checkpoint' in FLAGS and FLAGS.checkpoint is not None:
      config.checkpoint = FLAGS.checkpoint
    dar_flags.apply(config)
  return config


def load_reference(path: str, size: int) -> np.ndarray:
  """An image file -> (size, size, 3) float32 in [-1, 1] (RGB, centre square crop, bicubic)."""
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(os.path.expanduser(path)) as im:
      im = im.convert('RGB')
      w, h = im.size
      s = min(w, h)
      im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
      im = im.resize((size, size), Image.BICUBIC)
      arr = np.asarray(im, np.float32)
  except (UnidentifiedImageError, OSError) as e:
    raise UserError(f'--layout-from: cannot read {path} as an image ({e.__class__.__name__}); '
                    'pass a PNG or JPEG file') from None
  return arr / 127.5 - 1.0


def run_prefix(rs, config, labels) -> np.ndarray | None:
  """The layout prefix of a run (ids (k Q,)), or None."""
  from disa_jax.systems.dar.sampling import layout_prefix

  s = config.sampling
  k, q = int(s.prefix_groups), rs.tok.cfg.queries_per_group
  if s.layout_from:
    return layout_prefix(rs.tok, load_reference(s.layout_from, rs.tok.cfg.image_size), k)
  if s.prefix_from_sample:
    return rs.run(labels[:1], np.arange(1), decode=False, num_tokens=k * q).ids[0, :k * q]
  return None


def batches(labels, batch_size):
  n = len(labels)
  for lo in range(0, n, batch_size):
    ids = np.arange(lo, lo + batch_size)
    real = ids < n
    yield ids, real, labels[np.minimum(ids, n - 1)]


def strip(previews_b) -> np.ndarray:
  """(S, H, W, 3) uint8 -> one (H, S W, 3) strip."""
  return np.concatenate(list(previews_b), axis=1)


def generate_all(rs, config, labels, *, on_batch, previews=False, log=print, progress=False):
  """Runs every batch; calls on_batch(ids, images_uint8, previews_uint8 or None, generation)."""
  import jax

  from disa_jax.systems.dar.sampling import to_uint8

  rs.set_key(jax.random.key(config.sampling.seed))
  prefix = run_prefix(rs, config, labels)
  totals = dict(gpt_s=0.0, decoder_s=0.0, wall_s=0.0, tokens=0, images=0, first_batch_s=0.0)
  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=len(labels), desc='images', unit='img', leave=False)
  for i, (ids, real, lab) in enumerate(batches(labels, config.sampling.batch_size)):
    gen = rs.run(lab, ids, prefix=prefix, previews=previews)
    if gen.images is None:
      raise UserError('no image was decoded: --num-tokens must complete at least one group')
    images = to_uint8(gen.images)[real]
    prev = to_uint8(gen.previews)[:, real] if gen.previews is not None else None
    if not np.isfinite(np.asarray(gen.images)).all():
      raise UserError('the decoder produced non-finite pixels; check the weights and --cfg')
    on_batch(ids[real], images, prev, gen)
    if i == 0:
      totals['first_batch_s'] = gen.seconds['wall']
    totals['gpt_s'] += gen.seconds['gpt'] + gen.seconds.get('draft', 0.0)
    totals['decoder_s'] += gen.seconds['decoder']
    totals['wall_s'] += gen.seconds['wall']
    totals['tokens'] += rs.last_stats.tokens
    totals['images'] += int(real.sum())
    if gen.speculation:
      totals.setdefault('speculation', []).append(gen.speculation)
    if bar:
      bar.update(int(real.sum()))
  if bar:
    bar.close()
  totals['prefix_ids'] = 0 if prefix is None else int(len(prefix))
  return totals


def _run_metrics(config, rs, plan, totals, source, load_s):
  import jax

  s = config.sampling
  return {
    'config': config.get('name', ''), 'system': 'dar', 'model': source,
    'num_images': totals['images'], 'batch_size': s.batch_size, 'backend': jax.default_backend(),
    'cfg': str(s.cfg), 'temperature': s.temperature, 'top_k': s.top_k, 'top_p': s.top_p,
    'seed': s.seed, 'stages': plan.num_iter, 'decoder_steps_per_stage': list(plan.steps),
    'num_tokens': int(s.num_tokens) or int(config.model.gpt.block_size),
    'decoder_steps': int(s.decoder_steps) or int(config.model.tokenizer.num_groups),
    'prefix_ids': totals['prefix_ids'], 'load_s': round(load_s, 4),
    'sample_s': round(totals['wall_s'], 4), 'first_batch_s': round(totals['first_batch_s'], 4),
    'gpt_s': round(totals['gpt_s'], 4), 'decoder_s': round(totals['decoder_s'], 4),
    'tokens_per_s': totals['tokens'] / totals['gpt_s'] if totals['gpt_s'] > 0 else None,
    'images_per_s': totals['images'] / totals['wall_s'] if totals['wall_s'] > 0 else None,
    'compilations': dict(rs.last_stats.compiles),
    **({'speculation': speculation_summary(totals['speculation'])}
       if totals.get('speculation') else {}),
  }


def speculation_summary(stats: list) -> dict:
  """SpeculativeSampler stats (`Generation.speculation`) of several batches, summed."""
  from disa_jax.systems.dar.speculative import SpeculationStats

  keys = ('decided', 'accepted', 'row_rounds')
  tot = SpeculationStats(*([int(sum(v)) for v in zip(*(st[k] for st in stats), strict=True)]
                           for k in keys), passes=sum(st['target_passes'] for st in stats))
  return tot.as_dict()


# ------------------------------------------------------------------------------ disa-sample
def sample(config, out, *, overwrite=False, save_images=True, save_tokens=False,
           show_progress=True) -> dict:
  from PIL import Image

  from disa_jax.io.output import OutputDir, write_json
  from disa_jax.systems.dar.system import SYSTEM
  from disa_jax.tokenizers.image import make_grid

  SYSTEM.validate(config)
  plan = SYSTEM.stage_plan(config.sampling)
  labels = SYSTEM.conditions(config, config.sampling.num_images)
  inputs = [p for p in (config.checkpoint, config.tokenizer_checkpoint,
                        config.sampling.layout_from) if p]
  with OutputDir(out, overwrite=overwrite, inputs=inputs) as od:
    t0 = time.perf_counter()
    model, source = SYSTEM.build_model(config, seed=config.sampling.seed)
    rs = SYSTEM.make_sampler(model, config, None)
    load_s = time.perf_counter() - t0
    print(f'model: {config.get("name", "?")} ({source})')
    img_dir, prev_dir = os.path.join(od.path, 'images'), os.path.join(od.path, 'previews')
    if save_images:
      os.makedirs(img_dir, exist_ok=True)
    if config.sampling.previews:
      os.makedirs(prev_dir, exist_ok=True)
    grid, ids_all = [], []

    def on_batch(ids, images, prev, gen):
      for j, (i, img) in enumerate(zip(ids, images, strict=True)):
        if save_images:
          Image.fromarray(img).save(os.path.join(img_dir, f'{i:06d}.png'))
        if prev is not None:
          Image.fromarray(strip(prev[:, j])).save(os.path.join(prev_dir, f'{i:06d}.png'))
      grid.extend(images[: max(0, 64 - len(grid))])
      ids_all.append(gen.ids[: len(ids)])

    totals = generate_all(rs, config, labels, on_batch=on_batch,
                          previews=bool(config.sampling.previews), progress=show_progress)
    metrics = _run_metrics(config, rs, plan, totals, source, load_s)
    np.save(os.path.join(od.path, 'labels.npy'), labels)
    if save_tokens:
      np.save(os.path.join(od.path, 'tokens.npy'), np.concatenate(ids_all))
    Image.fromarray(make_grid(np.stack(grid))).save(os.path.join(od.path, 'grid.png'))
    write_json(os.path.join(od.path, 'metrics.json'), metrics)
  print(f'{totals["images"]} images in {totals["wall_s"]:.2f} s (GPT {totals["gpt_s"]:.2f} s, '
        f'decoder {totals["decoder_s"]:.2f} s); wrote {od.final}')
  return metrics


def sample_command(config):
  FLAGS = _flags()
  config = apply_flags(config)
  out = FLAGS.out or os.path.join('outputs', f'sample-{config.get("name", "run")}')
  return sample(config, out, overwrite=FLAGS.overwrite, save_images=FLAGS.save_images,
                save_tokens=FLAGS.save_tokens, show_progress=FLAGS.progress)


# ------------------------------------------------------------------------------- disa-bench
def parse_runs(text: str, num_ids: int, groups: int) -> list[tuple[str, dict]]:
  """'full,stop=192,grid=4' -> [(label, {num_tokens / decoder_steps})]; 'full' comes first."""
  runs = []
  for part in [p for p in text.split(',') if p]:
    name, _, value = part.partition('=')
    try:
      if name == 'full' and not value:
        runs.append(('full', {}))
      elif name == 'stop':
        n = int(value)
        if not 1 <= n <= num_ids:
          raise ValueError
        runs.append((part, {'num_tokens': n}))
      elif name == 'grid':
        s = int(value)
        if not 1 <= s <= groups:
          raise ValueError
        runs.append((part, {'decoder_steps': s}))
      elif name == 'spec':
        k = int(value)
        if not 1 <= k <= 16:
          raise ValueError
        runs.append((part, {'draft_tokens': k}))
      else:
        raise ValueError
    except ValueError:
      raise UserError(f'--runs entry {part!r}: use full, stop=N (N in 1..{num_ids}), grid=S '
                      f'(S in 1..{groups}) or spec=K (K in 1..16, with --draft), e.g. '
                      '--runs=full,stop=192,grid=4,spec=4') from None
  if not runs or runs[0][0] != 'full':
    runs.insert(0, ('full', {}))
  return runs


def benchmark(config, runs, *, batch_size: int, repeats: int = 1, log=print) -> dict:
  """Every run on the same batch (same labels and per-image randomness), compiled first."""
  import jax

  from disa_jax.systems.dar.system import SYSTEM

  model, source = SYSTEM.build_model(config, seed=config.sampling.seed)
  rs = SYSTEM.make_sampler(model, config, None)
  rs.set_key(jax.random.key(config.sampling.seed))
  labels = SYSTEM.conditions(config, batch_size)
  ids = np.arange(batch_size)
  rows, ref = [], None
  if any('draft_tokens' in k for _, k in runs) and rs.draft is None:
    raise UserError('--runs=spec=K needs a draft GPT: --draft=DIR or --draft=random:SIZE')
  for label, knobs in runs:
    rs.num_tokens = knobs.get('num_tokens')
    rs.decoder_steps = knobs.get('decoder_steps')
    rs.speculate = 'draft_tokens' in knobs                 # only spec runs speculate
    rs.draft_tokens = knobs.get('draft_tokens', rs.draft_tokens)
    rs.run(labels, ids)                                     # compile + warm
    best = None
    for _ in range(repeats):
      gen = rs.run(labels, ids)
      if best is None or gen.seconds['wall'] < best.seconds['wall']:
        best = gen
    images = np.asarray(best.images, np.float32)
    if ref is None:
      ref = images
    mad = float(np.mean(np.abs(images - ref)))
    u8, r8 = (np.clip(127.5 * x + 128, 0, 255).astype(np.uint8).astype(np.float64)
              for x in (images, ref))
    mse = float(np.mean((u8 - r8) ** 2))
    n_tok = rs.last_stats.tokens
    row = {'run': label, **knobs, 'tokens': n_tok // batch_size,
           'decoder_steps_run': decoder_steps_taken(model.tokenizer.cfg, best.num_ids,
                                                    knobs.get('decoder_steps')),
           'wall_s': round(best.seconds['wall'], 4), 'gpt_s': round(best.seconds['gpt'], 4),
           'decoder_s': round(best.seconds['decoder'], 4),
           'tokens_per_s': round(n_tok / (best.seconds['gpt'] + best.seconds.get('draft', 0.0)),
                                 2),
           'images_per_s': round(batch_size / best.seconds['wall'], 4),
           'mean_abs_diff_to_full': round(mad, 6),
           'psnr_to_full_db': None if mse == 0 else round(10 * np.log10(255.0 ** 2 / mse), 2)}
    if best.speculation:
      row['speculation'] = speculation_summary([best.speculation])
      row['draft_s'] = round(best.seconds['draft'], 4)
    row['speedup'] = round(rows[0]['wall_s'] / row['wall_s'], 3) if rows else 1.0
    rows.append(row)
    log(f'{label}: {row["wall_s"]:.3f} s (GPT {row["gpt_s"]:.3f}, decoder '
        f'{row["decoder_s"]:.3f}), {row["tokens_per_s"]:.1f} tokens/s, |diff| {mad:.4f}')
  return {'system': 'dar', 'config': config.get('name', ''), 'model': source,
          'full_mean_abs_pixel': round(float(np.mean(np.abs(ref))), 6),
          'batch_size': batch_size, 'repeats': repeats, 'backend': jax.default_backend(),
          'cfg': str(config.sampling.cfg), 'compilations': dict(rs.last_stats.compiles),
          'runs': rows}


def decoder_steps_taken(tok_cfg, num_ids: int, decoder_steps=None) -> int:
  """Decoder (flow) steps a run takes: the grid's steps whose group completed."""
  from disa_jax.systems.dar.tokenizer import flow_grid

  q = tok_cfg.queries_per_group
  grid = flow_grid(tok_cfg, num_steps=decoder_steps or None)
  return sum(1 for s in grid.group_start if (s // q + 1) * q <= num_ids)


def format_table(result) -> str:
  cols = ('run', 'tokens', 'decoder_steps_run', 'wall_s', 'gpt_s', 'draft_s', 'decoder_s',
          'tokens_per_s', 'images_per_s', 'speedup', 'mean_abs_diff_to_full', 'psnr_to_full_db')
  lines = [' | '.join(cols), ' | '.join('---' for _ in cols)]
  for r in result['runs']:
    lines.append(' | '.join(str(r.get(c)) for c in cols))
  for r in result['runs']:
    if r.get('speculation'):
      sp = r['speculation']
      lines.append(f"{r['run']}: acceptance {sp['acceptance']} (per group "
                   f"{sp['acceptance_per_group']}), ids per target pass "
                   f"{sp['ids_per_target_pass_per_group']}")
  return '\n'.join(lines)


def bench_command(config):
  import json

  FLAGS = _flags()
  config = apply_flags(config, sampling_flags=False)
  with config.unlocked():
    if FLAGS.cfg is not None:
      config.sampling.cfg = repr(float(FLAGS.cfg))
    config.sampling.seed = 0 if FLAGS.seed is None else FLAGS.seed   # disa-bench's default
  batch_size = 4 if FLAGS.batch_size is None else FLAGS.batch_size   # disa-bench's default
  if batch_size < 1 or FLAGS.repeats < 1:
    raise UserError('--batch_size and --repeats must be >= 1')
  for name in ('torch', 'phases', 'calibrate', 'dtypes', 'quality'):
    if FLAGS[name].present:
      raise UserError(f'--{name} is a MAR bench option; D-AR compares --runs=full,stop=N,grid=S')
  from disa_jax.systems.dar.system import SYSTEM

  SYSTEM.validate(config)
  text = FLAGS.runs if FLAGS['runs'].present else 'full'
  runs = parse_runs(text, int(config.model.gpt.block_size), int(config.sampling.num_groups))
  log = (lambda m: print(m, file=sys.stderr, flush=True)) if FLAGS.json else print
  result = benchmark(config, runs, batch_size=batch_size, repeats=FLAGS.repeats, log=log)
  result['command'] = ' '.join(['disa-bench'] + sys.argv[1:])
  text = json.dumps(result, indent=1)
  if FLAGS.json_out:
    from disa_jax.io.output import write_json

    write_json(FLAGS.json_out, result)
  print(text if FLAGS.json else format_table(result))
  return result


# -------------------------------------------------------------------------------- disa-eval
class EvalSampler:
  """D-AR under the shared evaluation loop (`disa_jax.eval.pipeline.run`): `generate` returns
  the decoded images in about [-1, 1] (B, H, W, 3) as the "tokens" of a batch (D-AR decodes
  during generation), `EvalDecoder` turns them into uint8. Image i's randomness is
  fold_in(key, i) as in disa-sample, so a resumed evaluation reproduces an uninterrupted one.
  `totals` sums this invocation's GPT / decoder seconds (the `_run_metrics` fields)."""

  def __init__(self, rs, prefix):
    self.rs, self.prefix, self.mesh = rs, prefix, None
    self.compile_log: dict = {}
    self.last_stats = None
    self.totals = dict(gpt_s=0.0, decoder_s=0.0, wall_s=0.0, tokens=0, images=0,
                       first_batch_s=0.0, prefix_ids=0 if prefix is None else int(len(prefix)))

  def plan(self, batch_size, **_):
    return None

  def compile(self, plan) -> float:
    return 0.0

  def generate(self, labels, key, *, image_ids=None, progress=None, **_):
    self.rs.set_key(key)
    ids = np.arange(len(labels)) if image_ids is None else np.asarray(image_ids)
    gen = self.rs.run(np.asarray(labels), ids, prefix=self.prefix)
    if gen.images is None:
      raise UserError('no image was decoded: --num-tokens must complete at least one group')
    t = self.totals
    if not t['images']:
      t['first_batch_s'] = gen.seconds['wall']
    for k in ('gpt', 'decoder', 'wall'):
      t[f'{k}_s'] += gen.seconds[k]
    t['tokens'] += self.rs.last_stats.tokens
    t['images'] += len(ids)
    self.last_stats = self.rs.last_stats
    return np.asarray(gen.images, np.float32)


class EvalDecoder:
  def decode(self, images):
    from disa_jax.systems.dar.sampling import to_uint8

    return to_uint8(images)


def fingerprint(config, labels, *, metric: str, inception, ref_stats, save_images) -> dict:
  """What must not change between an interrupted D-AR evaluation and its continuation."""
  import hashlib

  from disa_jax import integrity

  s = config.sampling
  return json_safe({
    'format': 'disa_jax.eval', 'version': 2, 'system': 'dar', 'model': config.model.to_dict(),
    'checkpoint': config.get('checkpoint', ''),
    'tokenizer_checkpoint': config.get('tokenizer_checkpoint', ''),
    'sampling': {k: s[k] for k in sorted(s.keys()) if k not in ('previews',)},
    'labels_sha1': hashlib.sha1(labels.tobytes()).hexdigest(), 'metric': metric,
    'inception': inception or '', 'ref_stats': ref_stats or '', 'save_images': bool(save_images),
    'matmul_precision': config.runtime.get('matmul_precision', ''),
    **integrity.model_fingerprints(checkpoint=config.get('checkpoint', ''),
                                   tokenizer_checkpoint=config.get('tokenizer_checkpoint', ''),
                                   inception=inception),
  })


def json_safe(d):
  import json

  return json.loads(json.dumps(d, default=str))


def evaluate(config, out, *, metric_name='inception', inception=None, ref_stats=None,
             inception_batch_size=0, precision_recall=True, overwrite=False, save_images=False,
             max_batches=0, show_progress=True) -> dict | None:
  """Generates the evaluation set (classes in blocks, official order) and scores it with the
  shared quality metrics (`inception`: FID / IS through the existing Inception pipeline).
  Resumable like MAR's disa-eval (`disa_jax.eval.workdir`): work happens in `<out>.partial/`
  (one shard per batch, images/NNNNNN.png with --save-images); the same command continues an
  interrupted run (`--max-batches` bounds one invocation); returns None when stopped early."""
  import shutil
  import types

  import jax

  from disa_jax.cli.flags import build_metric
  from disa_jax.eval import pipeline
  from disa_jax.eval.workdir import prepare_workdir
  from disa_jax.io.output import OUTPUT_MARKER, OutputLock, check_output_path, write_json
  from disa_jax.systems.dar.system import SYSTEM

  SYSTEM.validate(config)
  plan = SYSTEM.stage_plan(config.sampling)
  labels = SYSTEM.conditions(config, config.sampling.num_images, order='blocks')
  inputs = [p for p in (config.checkpoint, config.tokenizer_checkpoint,
                        config.sampling.layout_from, inception, ref_stats) if p]
  final = os.path.abspath(os.path.expanduser(out))
  partial = final + '.partial'
  check_output_path(final, overwrite=overwrite, inputs=inputs)
  lock = OutputLock(final)
  lock.acquire()
  try:
    metric = build_metric(metric_name, inception=inception, ref_stats=ref_stats,
                          batch_size=inception_batch_size, precision_recall=precision_recall,
                          cache=os.path.join(partial, 'ref_features.npz'))
    fp = fingerprint(config, labels, metric=metric_name, inception=inception,
                     ref_stats=ref_stats, save_images=save_images)
    resumed = prepare_workdir(final, partial, fp, overwrite)
    t0 = time.perf_counter()
    model, source = SYSTEM.build_model(config, seed=config.sampling.seed)
    rs = SYSTEM.make_sampler(model, config, None)
    load_s = time.perf_counter() - t0
    key = jax.random.key(config.sampling.seed)
    rs.set_key(key)
    sampler = EvalSampler(rs, run_prefix(rs, config, labels))
    print(f'model: {config.get("name", "?")} ({source}); {len(labels)} images, '
          f'{"continuing " + partial if resumed else "writing " + partial}')
    img_dir = None
    if save_images:
      img_dir = os.path.join(partial, 'images')
      os.makedirs(img_dir, exist_ok=True)
    bar = None
    if show_progress:
      from tqdm import tqdm

      bar = tqdm(total=len(labels), desc='images', unit='img', leave=False)
    s = config.sampling
    outcome = pipeline.run(
      sampler, EvalDecoder(), labels, plan=plan, key=key, batch_size=s.batch_size,
      sampling=types.SimpleNamespace(cfg=s.cfg, cfg_schedule=None, temperature=s.temperature),
      metric=metric, store=pipeline.ShardStore(partial), image_dir=img_dir,
      max_batches=max_batches, progress=(lambda done: bar.update(done - bar.n)) if bar else None)
    if bar:
      bar.close()
    if not outcome.complete:
      print(f'stopped after {outcome.batches_run} batches (--max_batches); run the same command '
            f'again to continue {partial}')
      return None
    totals = sampler.totals
    timing = {**(_run_metrics(config, rs, plan, totals, source, load_s) if rs.last_stats
                 else {}),
              **{k: round(v, 6) if isinstance(v, float) else v
                 for k, v in outcome.timing.items()}, 'num_images': outcome.num_images}
    result = {'metric': metric_name, 'metrics': outcome.metrics, 'timing': timing,
              'num_images': outcome.num_images, 'batches_run': outcome.batches_run,
              'batches_reused': outcome.batches_reused}
    write_json(os.path.join(partial, 'metrics.json'), result)
    write_json(os.path.join(partial, OUTPUT_MARKER), {'format': 'disa_jax.output'})
    if os.path.exists(final):
      shutil.rmtree(final)
    os.replace(partial, final)
  finally:
    lock.release()
  parts = [f'{k} {v:.4g}' for k, v in (outcome.metrics or {}).items()
           if isinstance(v, float)][:5]
  print(f'{len(labels)} images: {", ".join(parts) or "no metric"}; generation '
        f'{totals["wall_s"]:.2f} s this run; wrote {final}')
  return result


def eval_command(config):
  FLAGS = _flags()
  config = apply_flags(config)
  with config.unlocked():
    if FLAGS.num_images is None:
      config.sampling.num_images = 50 * int(config.model.gpt.num_classes)
  if FLAGS.metric == 'inception' and not (FLAGS.inception and FLAGS.ref_stats):
    raise UserError('--metric=inception needs --inception DIR and --ref_stats FILE (or pass '
                    '--metric=none for timing only)')
  out = FLAGS.out or os.path.join('outputs', f'eval-{config.get("name", "run")}')
  return evaluate(config, out, metric_name=FLAGS.metric, inception=FLAGS.inception,
                  ref_stats=FLAGS.ref_stats, inception_batch_size=FLAGS.inception_batch_size,
                  precision_recall=FLAGS.precision_recall, overwrite=FLAGS.overwrite,
                  save_images=FLAGS.save_images, max_batches=FLAGS.max_batches,
                  show_progress=FLAGS.progress)
