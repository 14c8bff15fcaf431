"""Text tokenizer wrapper and prompt strings, plus the Harmon configs.

No real Qwen2.5 tokenizer.json is available offline, so the tests build a Qwen2-style one with
the `tokenizers` library itself (NFC normaliser, the Qwen2 split regex, byte-level mapping, BPE
trained on a small corpus, the three chat special tokens added) and check the wrapper's
behaviour: special tokens are single ids inside the template, no BOS/EOS is added, ids decode
back to the exact string, and missing / malformed files fail with one-line `UserError`s. The
exact Qwen ids of spec §2.1 need the real file.
"""

import importlib.util
from pathlib import Path

import pytest

tokenizers = pytest.importorskip('tokenizers')

from disa_jax.errors import UserError  # noqa: E402
from disa_jax.tokenizers.text import (  # noqa: E402
  PROMPT_TEMPLATE,
  TextTokenizer,
  harmon_text,
  read_prompts,
  uncond_text,
)

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def tokenizer_json(tmp_path_factory):
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior='isolated'),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  corpus = ['Generate an image: a red apple on a wooden table.', 'a photo of a cat',
            'Generate an image.', 'two dogs and 3 cats, 4K photo'] * 20
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=['<|endoftext|>', '<|im_start|>',
                                                                '<|im_end|>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus, trainer)
  path = tmp_path_factory.mktemp('tok') / 'tokenizer.json'
  tok.save(str(path))
  return path


def test_prompt_strings():
  assert harmon_text('a cat') == ('<|im_start|>user\nGenerate an image: a cat<|im_end|>\n'
                                  '<|im_start|>assistant\n')
  assert harmon_text(' a cat ', append_period=True).count('a cat.<|im_end|>') == 1
  assert uncond_text() == PROMPT_TEMPLATE.format(input='Generate an image.')
  assert not harmon_text('x').startswith('\n') and 'system' not in harmon_text('x')


def test_encode_template(tokenizer_json):
  tok = TextTokenizer(tokenizer_json)
  start, end = tok.token_id('<|im_start|>'), tok.token_id('<|im_end|>')
  ids = tok.prompt_ids('a red apple on a wooden table.')
  assert ids[0] == start and ids.count(start) == 2 and ids.count(end) == 1
  assert tok.decode(ids) == harmon_text('a red apple on a wooden table.')
  u = tok.uncond_ids()
  assert u[0] == start and tok.decode(u) == uncond_text()
  assert tok.eos_id == end
  # Same text, same ids; a different prompt, different ids.
  assert tok.prompt_ids('a cat') == tok.prompt_ids('a cat') != tok.prompt_ids('a dog')


def test_errors(tmp_path, tokenizer_json):
  with pytest.raises(UserError, match='does not exist'):
    TextTokenizer(tmp_path / 'missing.json')
  with pytest.raises(UserError, match='no text tokenizer'):
    TextTokenizer('')
  bad = tmp_path / 'bad.json'
  bad.write_text('{not json')
  with pytest.raises(UserError, match='not a tokenizers'):
    TextTokenizer(bad)
  with pytest.raises(UserError, match='without tokenizer.json'):
    TextTokenizer(tmp_path)
  assert TextTokenizer(tokenizer_json.parent).path == str(tokenizer_json)
  prompts = tmp_path / 'p.txt'
  prompts.write_text('a cat\n\n a dog \n')
  assert read_prompts(prompts) == ['a cat', 'a dog']
  with pytest.raises(UserError, match='does not exist'):
    read_prompts(tmp_path / 'none.txt')


@pytest.mark.parametrize('name,hidden,mar_width', [('0_5b', 896, 768), ('1_5b', 1536, 1280)])
def test_configs(name, hidden, mar_width):
  from disa_jax.systems.harmon.config import HarmonConfig, harmon_config

  spec = importlib.util.spec_from_file_location('cfg', REPO / 'configs' / 'harmon' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  assert c.system == 'harmon' and c.sampling.cfg == 3.0 and c.sampling.cfg_schedule == 'constant'
  assert c.sampling.num_iter == 64 and c.sampling.upper_steps == 100 and c.sampling.preset == 'mar'
  arch = HarmonConfig.from_dict(c.model.to_dict())
  assert arch.llm.hidden_size == hidden and arch.mar.encoder_embed_dim == mar_width
  assert arch.image_size == 512 and arch.runtime_mar.seq_len == 1024
  for variant in ('cpu', 'tiny'):
    small = HarmonConfig.from_dict(mod.get_config(variant).model.to_dict())
    assert small.llm.num_hidden_layers < arch.llm.num_hidden_layers
  with pytest.raises(ValueError, match='unknown config argument'):
    mod.get_config('gpu')
  with pytest.raises(ValueError, match='unknown Harmon variant'):
    harmon_config('harmon_7b')


PROMPTS = ['a red apple on a wooden table.', 'Two  dogs\tand 3 cats, 4K photo!!',
           "it's a café — naïve 東京 12345", 'line one\nline two', '   leading and trailing   ']


def test_ids_equal_transformers_qwen2_tokenizers(tokenizer_json, tmp_path):
  """Our ids == what the official code's tokenizer class returns for the same files: the
  transformers `Qwen2TokenizerFast` on the same tokenizer.json, and the pure-Python
  `Qwen2Tokenizer` (its own Qwen2 split regex, NFC and byte-level BPE) on the vocab / merges
  exported from it, for the conditional and unconditional rows of awkward prompts (unicode,
  digits, runs of spaces, tabs and newlines). Stands in for the real Qwen2.5 file, which is not
  available offline."""
  transformers = pytest.importorskip('transformers')
  from tokenizers import Tokenizer

  tok = TextTokenizer(tokenizer_json)
  fast = transformers.Qwen2TokenizerFast(tokenizer_file=str(tokenizer_json))
  Tokenizer.from_file(str(tokenizer_json)).model.save(str(tmp_path))
  slow = transformers.Qwen2Tokenizer(str(tmp_path / 'vocab.json'), str(tmp_path / 'merges.txt'),
                                     additional_special_tokens=['<|im_start|>', '<|im_end|>'])
  assert slow.convert_tokens_to_ids('<|im_start|>') == tok.token_id('<|im_start|>')
  for prompt in PROMPTS:
    text = harmon_text(prompt)
    ours = tok.prompt_ids(prompt)
    assert ours == fast(text)['input_ids'] == slow(text)['input_ids'], prompt
    assert len(ours) > len(text.split())                 # really split into sub-words
  u = uncond_text()
  assert tok.uncond_ids() == fast(u)['input_ids'] == slow(u)['input_ids']
