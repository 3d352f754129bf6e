"""A word-level vocabulary for toy corpora, and the English->Spanish corpus shipped with fasttf.

    vocab = Vocab.build(["let's go", "to go"])
    vocab.encode("let's go")          -> [4, 5, 1]      (words, then <EOS>)
    vocab.decode([4, 5, 1, 0, 0])     -> "let's go"     (stops at <EOS>, skips <PAD>)

The special tokens come first, in this order: <PAD> = 0 (fills short sentences of a batch),
<EOS> = 1 (ends every sentence and, as in the lecture notes, also starts the decoder's input),
<UNK> = 2 (a word the vocabulary has not seen). Words are lower-cased and split on white space;
punctuation stays out of the toy corpus, so "let's" is one word.
"""

import json
import os
import random

import torch

PAD, EOS, UNK = "<PAD>", "<EOS>", "<UNK>"
SPECIALS = (PAD, EOS, UNK)

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
EN_ES_PATH = os.path.join(DATA_DIR, "en_es.tsv")


def tokenize(sentence: str) -> list[str]:
    return sentence.lower().split()


class Vocab:
    """Words <-> ids. Ids 0, 1, 2 are <PAD>, <EOS>, <UNK>; the rest in first-seen order."""

    def __init__(self, words):
        words = list(words)
        if tuple(words[:len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"Vocab: expected the words to start with {SPECIALS}, got {words[:3]}")
        if len(set(words)) != len(words):
            raise ValueError("Vocab: expected each word once")
        self.words = words
        self.ids = {word: index for index, word in enumerate(words)}

    @classmethod
    def build(cls, sentences) -> "Vocab":
        words = list(SPECIALS)
        seen = set(words)
        for sentence in sentences:
            for word in tokenize(sentence):
                if word not in seen:
                    seen.add(word)
                    words.append(word)
        return cls(words)

    pad_id = property(lambda self: self.ids[PAD])
    eos_id = property(lambda self: self.ids[EOS])
    unk_id = property(lambda self: self.ids[UNK])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, sentence: str, add_eos: bool = True) -> list[int]:
        ids = [self.ids.get(word, self.unk_id) for word in tokenize(sentence)]
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids) -> str:
        """The words up to the first <EOS>; <PAD> is skipped."""
        words = []
        for index in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if index == self.eos_id:
                break
            if index != self.pad_id:
                words.append(self.words[index])
        return " ".join(words)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(self.words, file, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path: str) -> "Vocab":
        with open(path, encoding="utf-8") as file:
            return cls(json.load(file))


def pad_batch(sequences, pad_id: int) -> torch.Tensor:
    """A list of id lists -> LongTensor (N, longest), padded on the right with pad_id."""
    longest = max(len(sequence) for sequence in sequences)
    batch = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, :len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return batch


def read_pairs(path: str = EN_ES_PATH, split: str | None = None) -> list[tuple[str, str]]:
    """(english, spanish) pairs from a `english<TAB>spanish<TAB>split` file; split None = all."""
    pairs = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, 1):
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) != 3:
                raise ValueError(f"{path}:{line_number}: expected english<TAB>spanish<TAB>split, got {line!r}")
            if split is None or fields[2] == split:
                pairs.append((fields[0], fields[1]))
    return pairs


def batches(pairs, source_vocab: Vocab, target_vocab: Vocab, batch_size: int, seed: int = 0, always=()):
    """Endless random batches (src, tgt_in, tgt_out) of LongTensors, each (N, longest):

        src     = english words + <EOS>
        tgt_in  = <EOS> + spanish words          (the decoder's input: <EOS> starts it)
        tgt_out = spanish words + <EOS>          (what it must predict, one step ahead)

    The pairs in `always` are in every batch (the demo puts the notes' pairs there), the rest of
    each batch is drawn at random from `pairs`.
    """
    rng = random.Random(seed)
    always = list(always)[:batch_size]
    while True:
        chosen = always + [pairs[rng.randrange(len(pairs))] for _ in range(batch_size - len(always))]
        yield encode_pairs(chosen, source_vocab, target_vocab)


def encode_pairs(pairs, source_vocab: Vocab, target_vocab: Vocab):
    src = pad_batch([source_vocab.encode(english) for english, _ in pairs], source_vocab.pad_id)
    spanish = [target_vocab.encode(spanish, add_eos=False) for _, spanish in pairs]
    eos = target_vocab.eos_id
    tgt_in = pad_batch([[eos] + ids for ids in spanish], target_vocab.pad_id)
    tgt_out = pad_batch([ids + [eos] for ids in spanish], target_vocab.pad_id)
    return src, tgt_in, tgt_out
