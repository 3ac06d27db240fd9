"""
The tokenizers of NExT-GPT, all byte-pair encodings: the byte-level BPE of the text encoders around it, CLIP's
(ImageBind's text trunk, Stable Diffusion's and Zeroscope's text encoders) and RoBERTa's (AudioLDM's CLAP), with one
merge loop and the Unicode classes their official pre-tokenisation patterns need; and LLaMA's sentencepiece BPE with the
38 tokens NExT-GPT adds (LLaMATokenizer, and train_sentencepiece for the toy world's and the tiny model's).

References
- Sennrich et al. 2016, Neural Machine Translation of Rare Words with Subword Units, https://arxiv.org/abs/1508.07909
- CLIP's simple_tokenizer.py (= ImageBind's SimpleTokenizer, open_clip's), https://github.com/openai/CLIP
- GPT-2's encoder.py (byte-to-unicode table, the pre-tokenisation pattern RoBERTa reuses), https://github.com/openai/gpt-2
- transformers: models/clip/tokenization_clip.py, models/roberta/tokenization_roberta.py,
  models/llama/tokenization_llama.py (the slow tokenizer of 4.29, which NExT-GPT was trained with)
- sentencepiece, https://github.com/google/sentencepiece
"""

import functools
import gzip
import html
import json
import math
import os
import re
import sys
import unicodedata

import sentencepiece as spm
import torch

import weights

BPE_URL = "https://github.com/facebookresearch/ImageBind/raw/main/imagebind/bpe/bpe_simple_vocab_16e6.txt.gz"
DEFAULT_BPE = os.path.join("checkpoints", "bpe_simple_vocab_16e6.txt.gz")


def bytes_to_unicode():
    # every byte gets a printable unicode stand-in, so BPE works on strings without whitespace/control characters
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # the rest (space, control bytes, ...) go to 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe_merge(parts, ranks):
    """Byte-level BPE of one word: merge the lowest-ranked adjacent pair everywhere it occurs, until no known pair is
    left. parts: the word's symbols; ranks: {(a, b): rank}. Shared by CLIPTokenizer and RobertaTokenizer."""
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


@functools.lru_cache(maxsize=None)
def unicode_classes():
    """
    Bodies of regex character classes for \\p{L} (letters), \\p{N} (numbers) and \\s (Unicode White_Space) as the
    `regex` module has them: plain `re` has no \\p{..}, so they are built once from unicodedata's categories (about a
    second). Divergence left: Python's unicodedata may be an older Unicode version than `regex`'s, so letters added to
    Unicode since count as "other" here. (re's own \\s would also count \\x1c-\\x1f.)
    """
    ranges = {"L": [], "N": []}
    start = {"L": None, "N": None}
    for i in range(sys.maxunicode + 2):
        major = unicodedata.category(chr(i))[0] if i <= sys.maxunicode else ""
        for cls in ("L", "N"):
            if major == cls and start[cls] is None:
                start[cls] = i
            elif major != cls and start[cls] is not None:
                a, b = start[cls], i - 1
                ranges[cls].append(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else ""))
                start[cls] = None
    S = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
    return "".join(ranges["L"]), "".join(ranges["N"]), S


@functools.lru_cache(maxsize=None)
def _pattern():
    # The official pattern, written for the `regex` module:
    #   <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
    L, N, S = unicode_classes()
    return re.compile(rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[{L}]+|[{N}]|[^{S}{L}{N}]+",
                      re.IGNORECASE)


# the parts of ftfy.fix_text that matter for clean text; mojibake repair (fix_encoding) is not replicated
_LIGATURES = dict(zip(map(ord, "ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬅﬆ"),
                      "IJ ij ʼn DZ Dz dz DŽ Dž dž LJ Lj lj NJ Nj nj ff fi fl ffi ffl ſt st".split()))
_WIDTH = {0x3000: " ", **{i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)}}  # full -> half
_QUOTES = {**{i: "'" for i in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)}, **{i: '"' for i in range(0x201C, 0x2020)}}
_CONTROL = {i: None for i in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                              *range(0xFFF9, 0xFFFD)]}
_WHITESPACE = re.compile(r"[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_text(text, style="clip"):
    """
    style "clip" (ImageBind, open_clip): ftfy.fix_text (its non-mojibake steps), html.unescape twice, whitespace
    collapse, lower case. style "hf" (transformers' fast CLIPTokenizer, the default in transformers 5, which diffusers
    pipelines call): NFC, whitespace collapse, lower case, no ftfy, no html unescaping. (transformers 4's slow
    tokenizer ran ftfy, without unescaping.) The styles differ only on such characters: “quotes”, &amp;, ﬁ, ＦＵＬＬ.
    """
    if style == "hf":
        return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip().lower()
    if style != "clip":
        raise ValueError(f"unknown cleaning style {style!r}: 'clip' or 'hf'")
    text = text.replace("\r\n", "\n").translate(_LIGATURES).translate(_WIDTH).translate(_QUOTES).translate(_CONTROL)
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """
    multimodal_preprocessors.SimpleTokenizer (= open_clip's SimpleTokenizer = transformers' CLIPTokenizer ids):
    byte-level BPE with `</w>` word ends. Read from the official bpe_simple_vocab_16e6.txt.gz (from_bpe_gz) or from a
    diffusers/transformers tokenizer/ folder with vocab.json + merges.txt (from_folder, e.g. Stable Diffusion's, whose
    text cleaning defaults to transformers' own, clean="hf"; see clean_text).
    encode(text) -> ids without SOT/EOT; tok(texts) -> (B, 77) LongTensor: SOT, ids, EOT, then pad_id
    (0 for ImageBind / open_clip; Stable Diffusion 1.x pads with EOT 49407); too long: tokens[:76] + [EOT].
    """

    def __init__(self, encoder, merges, pad_id=0, context_length=77, clean="clip"):
        self.clean = clean
        self.encoder = encoder  # token string -> id
        self.decoder = {v: k for k, v in encoder.items()}
        self.bpe_ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.sot_id, self.eot_id = encoder["<|startoftext|>"], encoder["<|endoftext|>"]
        self.pad_id, self.context_length = pad_id, context_length
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}

    @classmethod
    def from_bpe_gz(cls, path=DEFAULT_BPE, pad_id=0, clean="clip"):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"CLIP BPE vocabulary not found: {path}\n  It ships with the official ImageBind code (1.3 MB): "
                f"download {BPE_URL} to {DEFAULT_BPE} (the same file is open_clip/bpe_simple_vocab_16e6.txt.gz)")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # first line is a header
        vocab = list(bytes_to_unicode().values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        return cls({t: i for i, t in enumerate(vocab)}, merges, pad_id, clean=clean)

    @classmethod
    def from_folder(cls, folder, pad_id=None, clean="hf"):
        """A transformers/diffusers CLIP tokenizer folder; the pad token comes from its special_tokens_map.json."""
        vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        for p in (vocab_path, merges_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"CLIP tokenizer file not found: {p} (a tokenizer/ folder needs "
                                        "vocab.json and merges.txt)")
        with open(vocab_path, encoding="utf-8") as f:
            encoder = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        if pad_id is None:
            pad_id = 0
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                p = os.path.join(folder, name)
                pad = weights.read_json(p).get("pad_token") if os.path.isfile(p) else None
                if isinstance(pad, dict):
                    pad = pad.get("content")
                if pad is not None:
                    pad_id = encoder[pad]
                    break
        return cls(encoder, merges, pad_id, clean=clean)

    def bpe(self, token):
        if token not in self.cache:
            self.cache[token] = " ".join(bpe_merge(list(token[:-1]) + [token[-1] + "</w>"], self.bpe_ranks))
        return self.cache[token]

    def encode(self, text):
        ids = []
        for token in _pattern().findall(clean_text(text, self.clean)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def decode(self, ids):
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts, context_length=None):
        context_length = context_length or self.context_length
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text)
            ids = ids[:context_length - 1] + [self.eot_id]  # EOT always last, even when truncated
            out[i, :len(ids)] = torch.tensor(ids)
        return out  # (B, 77)


@functools.lru_cache(maxsize=None)
def _gpt2_pattern():
    # GPT-2's pre-tokenisation, written for the `regex` module:
    #   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    # plain `re` has no \p{..}: the classes come from unicode_classes
    L, N, S = unicode_classes()
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")


class RobertaTokenizer:
    """
    transformers RobertaTokenizer (byte-level BPE, AudioLDM's `tokenizer/`): texts -> (ids, attention_mask), each
    `<s> tokens </s>` padded with <pad> to max_length (the AudioLDM pipeline pads to the tokenizer's maximum, 512).
    """

    def __init__(self, vocab, merges, max_length=512):
        self.encoder = vocab
        self.bpe_ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.bos, self.pad, self.eos, self.unk = vocab["<s>"], vocab["<pad>"], vocab["</s>"], vocab.get("<unk>", 3)
        self.max_length = max_length
        self.cache = {}

    @classmethod
    def from_folder(cls, folder, max_length=None):
        """A transformers tokenizer folder: vocab.json, merges.txt (tokenizer_config.json's model_max_length)."""
        vocab = weights.read_json(os.path.join(folder, "vocab.json"))
        path = os.path.join(folder, "merges.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer merges not found: {path}")
        with open(path, encoding="utf-8") as f:
            merges = [ln for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
        conf = os.path.join(folder, "tokenizer_config.json")
        if max_length is None and os.path.isfile(conf):
            max_length = weights.read_json(conf).get("model_max_length")
        # transformers writes a huge sentinel when no maximum is known; RoBERTa's is 512 (514 positions - 2)
        return cls(vocab, merges, max_length if isinstance(max_length, int) and max_length < 100_000 else 512)

    def bpe(self, word):
        if word not in self.cache:
            self.cache[word] = bpe_merge(list(word), self.bpe_ranks)
        return self.cache[word]

    def encode(self, text):
        """Text -> BPE ids, without <s> / </s>."""
        ids = []
        for piece in _gpt2_pattern().findall(text):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder.get(t, self.unk) for t in self.bpe(word)]
        return ids

    def __call__(self, texts, max_length=None):
        texts = [texts] if isinstance(texts, str) else list(texts)
        L = max_length or self.max_length
        ids = torch.full((len(texts), L), self.pad, dtype=torch.long)
        mask = torch.zeros((len(texts), L), dtype=torch.long)
        for i, text in enumerate(texts):
            row = [self.bos] + self.encode(text)[:L - 2] + [self.eos]  # truncation keeps </s>
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return ids, mask


def byte_vocab(kind):
    """A vocabulary of single bytes, no merges, in the tokenizer-folder layout of CLIP ("clip": with `</w>` word ends
    and its two specials) or RoBERTa ("roberta"): text that needs no BPE (the toy world's, the tiny random model's)."""
    chars = list(bytes_to_unicode().values())
    if kind == "clip":
        return chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    if kind == "roberta":
        return ["<s>", "<pad>", "</s>", "<unk>"] + chars
    raise ValueError(f"byte_vocab: kind must be 'clip' or 'roberta', not {kind!r}")


# ----------------------------------------------------------------------------------------------------------------------
# LLaMA's tokenizer: a sentencepiece BPE over text, plus the tokens NExT-GPT adds

class LLaMATokenizer:
    """
    sentencepiece `tokenizer.model` (LLaMA's) plus added tokens given as strings, which get the ids after the
    sentencepiece vocabulary (NExT-GPT: 38 tokens, ids 32000..32037) and are never split.
    """

    def __init__(self, model_path, special_tokens=()):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"sentencepiece model not found: {model_path} (the LLaMA folder's tokenizer.model)")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.special = {}  # text -> id
        self.add_special_tokens(special_tokens)

    def add_special_tokens(self, tokens):
        for t in tokens:
            if t not in self.special:
                self.special[t] = self.sp.get_piece_size() + len(self.special)
        self.special_by_id = {i: t for t, i in self.special.items()}
        # longest first, so that a token that is a prefix of another never wins
        alternatives = sorted(self.special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    def __len__(self):
        return self.sp.get_piece_size() + len(self.special)

    def encode(self, text, bos=True):
        ids = [self.bos_id] if bos else []
        # re.split with a group keeps the separators: special tokens land at the odd places
        chunks = self._split.split(text) if self._split else [text]
        for k, chunk in enumerate(chunks):
            if k % 2:
                ids.append(self.special[chunk])
                continue
            # Whitespace next to an added token is dropped, as the slow LlamaTokenizer of transformers 4.29 (which
            # NExT-GPT was trained with) does for tokens added by add_tokens: "### Human: <Img>" is "### Human:" <Img>.
            if k > 0:
                chunk = chunk.lstrip()
            if k < len(chunks) - 1:
                chunk = chunk.rstrip()
            if chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def decode(self, ids):
        out, run = [], []
        for i in list(map(int, ids)) + [None]:  # None flushes the last run
            if i is None or i in self.special_by_id:
                if run:
                    text = self.sp.decode(run)
                    # sentencepiece drops the word-start space of a run; keep it when the run follows other text
                    if out and self.sp.id_to_piece(run[0]).startswith("\u2581"):
                        text = " " + text
                    out.append(text)
                run = []
                if i is not None:
                    out.append(self.special_by_id[i])
            else:
                run.append(i)
        return "".join(out)



def train_sentencepiece(text, vocab_size, prefix, add_dummy_prefix=True):
    """A LLaMA-style sentencepiece BPE (no normalisation, spaces kept, digits split) trained on text -> its .model path
    (the toy world's LLM, the tiny random model). add_dummy_prefix=False makes "###" alone one piece (with the prefix
    it is ['▁', '###']), as id 835 is in LLaMA's vocabulary. Asks for at most vocab_size pieces: a short text gives
    fewer."""
    with open(prefix + ".txt", "w") as f:
        f.write(text)
    spm.SentencePieceTrainer.train(
        input=prefix + ".txt", model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, user_defined_symbols=["###", "\n"], byte_fallback=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False,
        add_dummy_prefix=add_dummy_prefix, num_threads=1, minloglevel=2)
    return prefix + ".model"
