"""fasttf's models: the encoder-decoder Transformer of the lecture notes and its toy tokenizer."""

from fasttf.models.tokenizer import Vocab
from fasttf.models.transformer import Decoded, Transformer

__all__ = ["Decoded", "Transformer", "Vocab"]
