"""A character-level tokenizer for the arithmetic task, built in code, saved in Hugging Face format.

Every character of the alphabet is one token; special tokens come first, so their ids are fixed::

    <pad>=0  <bos>=1  <eos>=2  <unk>=3  then "0".."9", "+", "-", "=", "#", "|", " ", "c", "b", "\\n"

``tok("12+3=")["input_ids"]`` is ``[1, 5, 6, 14, 7, 16]`` (``<bos>`` then one id per character);
``add_special_tokens=False`` drops the ``<bos>``. Decoding concatenates tokens as they are (no
spaces inserted or removed), so ``tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s``
for every string over the alphabet. ``save_pretrained`` / ``AutoTokenizer.from_pretrained``
round-trip it (``tokenizer.json`` holds the whole pipeline).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Every character engine.task.arithmetic writes (prompts, steps, answer marker), plus newline.
ALPHABET = "0123456789+-=#| cb\n"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The task's tokenizer: one token per character of ``ALPHABET``, ``<bos>`` prepended.

    Characters outside the alphabet encode to ``<unk>``. Padding is on the right with ``<pad>``.
    There is no chat template: the task uses plain prompt strings.
    """
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *ALPHABET])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split into single characters, keeping whitespace ("[\s\S]" also matches newline).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins tokens with nothing between them; the default decoder would insert spaces.
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
