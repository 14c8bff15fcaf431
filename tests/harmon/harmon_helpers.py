"""Shared pieces of the Harmon tests: a tiny random Harmon and its PyTorch twin."""

import numpy as np
from flax import nnx

from disa_jax.convert.mapping import flax_state_to_torch
from disa_jax.systems.harmon.config import tiny_config
from disa_jax.systems.harmon.model import Harmon


def randomize(model, seed=0, scale=0.1):
  """Every parameter random and non-zero (norm scales near 1): zero-initialised biases, adaLN
  and output layers would hide bugs."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    noise = rng.standard_normal(var.shape).astype(np.float32) * scale
    var[...] = 1.0 + noise if str(path[-1]) == 'scale' else noise
  nnx.update(model, state)
  return model


def tiny_harmon(seed=0):
  return randomize(Harmon(tiny_config(), rngs=nnx.Rngs(seed)), seed)


def torch_twin(model):
  from reference.harmon import TorchHarmon, load_from_flax

  return load_from_flax(TorchHarmon(model.config), flax_state_to_torch(nnx.state(model)))


def prompts(rows, lengths, vocab=512, seed=0, pad_id=0):
  """Right-padded ids [rows, max(lengths)] and validity mask."""
  rng = np.random.default_rng(seed)
  lp = max(lengths)
  ids = np.full((rows, lp), pad_id, np.int64)
  valid = np.zeros((rows, lp), bool)
  for r, n in enumerate(lengths):
    ids[r, :n] = rng.integers(0, vocab, n)
    valid[r, :n] = True
  return ids, valid


def max_rel_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def write_tokenizer_json(path, vocab_size=400):
  """A Qwen2-style byte-level BPE tokenizer.json built offline with the `tokenizers` library
  (Qwen2 split regex, byte-level, the three chat special tokens); ids < vocab_size."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior='isolated'),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  corpus = ['Generate an image: a red apple on a wooden table.', 'a photo of a cat',
            'Generate an image.', 'two dogs and 3 cats, 4K photo'] * 20
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[
    '<|endoftext|>', '<|im_start|>', '<|im_end|>'],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus, trainer)
  tok.save(str(path))
  return path
