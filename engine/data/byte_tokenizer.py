"""A byte-level tokenizer built in code, for the tiny model on any text (no download).

Every UTF-8 string encodes: each of its bytes is one token (256 byte tokens, GPT-2's byte-to-
character alphabet, no merges), so nothing is ever unknown and
``tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s`` for every string. Special tokens
come first, so their ids are fixed::

    <pad>=0  <bos>=1  <eos>=2  <|system|>=3  <|user|>=4  <|assistant|>=5  then the 256 bytes

``tok(s)`` prepends ``<bos>``. The chat template (``CHAT_TEMPLATE``) writes every turn as
``<|role|>content<eos>`` after one ``<bos>``; ``add_generation_prompt=True`` appends
``<|assistant|>``, so an assistant reply is exactly the continuation of the rendered prompt and
ends with ``<eos>`` (where generation stops). Roles other than system, user and assistant are an
error. ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it offline
(``tokenizer.json`` holds the whole pipeline, the template is saved beside it).

The embedded math task keeps its own 23-token tokenizer (:mod:`engine.task.tokenizer`).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)
NUM_BYTES = 256

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer: special tokens, then one token per byte; ``<bos>`` prepended,
    right padding with ``<pad>``, and the chat template above."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: len(SPECIAL_TOKENS) + i for i, char in enumerate(sorted(alphabet))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    # bytes -> stand-in characters, no regex split and no added space: one token per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
