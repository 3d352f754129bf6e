"""The encoder-decoder Transformer of the lecture notes, the whole model in one file.

    model = Transformer(src_vocab=20, tgt_vocab=20, d_model=64, num_heads=4, backend="fasttf")
    logits, loss = model(src, tgt_in, tgt_out)    # (N, T, tgt_vocab) and the mean cross-entropy
    decoded = model.greedy_decode(src)            # tokens (N, T') up to <EOS>, with a KV cache

The pieces, in the order the notes meet them (N sentences, S source and T target words, D = d_model):

    word embedding       x = embedding[word]                     init N(0, 1/D), see the scale below
    positional encoding  x = x * sqrt(D) + PE[offset + position]  PE[p, 2i] = sin(p / 10000^(2i/D)),
                                                                  PE[p, 2i+1] = cos(p / 10000^(2i/D))
    self-attention       softmax(Q K^T / sqrt(D/H)) V per head, Q = x Wq, K = x Wk, V = x Wv
    residual + LayerNorm post-LN (the paper): x = LN(x + f(x));  pre-LN: x = x + f(LN(x)), LN at the end
    feed-forward         f(x) = relu(x W1 + b1) W2 + b2
    decoder              the same with causal self-attention (word t sees words <= t), then
                         encoder-decoder attention (Q from the decoder, K and V from the encoder's
                         output) with its own residual, then the feed-forward
    output               logits = x Wfc + bfc, softmax over the Spanish vocabulary

The embedding is scaled by sqrt(D) as in "Attention is all you need"; its weights start with
standard deviation 1/sqrt(D), so the scaled embedding and the PE values (in [-1, 1]) start at
the same size. `scale_embedding=False` gives the notes' plain `embedding + PE`.

Two backends, one set of parameters (the same `state_dict` loads into both):
  - "torch": plain PyTorch only: `nn.MultiheadAttention`, PE computed eagerly
    (`fasttf.reference.positional_encoding`), `F.layer_norm(residual + dropout(x))`.
  - "fasttf": `fasttf.scaled_dot_product_attention` (the Triton kernel) on the projections of
    `fasttf.MultiheadAttention`'s weights (the layout of `nn.MultiheadAttention`: in_proj_weight
    (3D, D) stacking Wq, Wk, Wv; out_proj), `fasttf.positional_encoding` and
    `fasttf.add_layer_norm` (add + LayerNorm in one pass; in pre-LN each add is fused with the
    LayerNorm that follows it, so only the very first LayerNorm of a stack runs alone, as
    `F.layer_norm`: there is no add before it to fuse), and `fasttf.dropout` after the embedding
    and inside the feed-forward (on the CPU 8-12x faster than `F.dropout`: fasttf/ops/dropout.py).
Masks go to the kernels as they are: the source padding as a bool (N, 1, 1, S) "keep" mask,
the decoder's causality as `is_causal`. Targets are padded on the right, so causality already
keeps every real target word away from the padding after it.

Decoding (`greedy_decode`) feeds each predicted word back until <EOS>, with a cache per decoder
layer: the self-attention keys/values grow by one step per word, the encoder-decoder keys/values
are computed once; the new word's position comes in as the PE `offset`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fasttf import reference
from fasttf.multihead_attention import MultiheadAttention as FasttfMultiheadAttention
from fasttf.ops.attention import scaled_dot_product_attention as fasttf_sdpa
from fasttf.ops.dropout import dropout as fasttf_dropout
from fasttf.ops.positional_encoding import positional_encoding as fasttf_positional_encoding
from fasttf.ops.residual import add_layer_norm as fasttf_add_layer_norm

BACKENDS = ("fasttf", "torch")

# ----------------------------------------------------------------------------------------------
# The ops where the backends differ: positional encoding, add + LayerNorm, attention, dropout.


def add_positions(backend, x, offset, scale):
    """x * scale + PE[offset + position]: x (N, T, D), offset an int."""
    if backend == "fasttf":
        return fasttf_positional_encoding(x, offset, scale=scale)
    return reference.positional_encoding(x, offset, scale=scale)


def add_norm(backend, x, residual, norm: nn.LayerNorm, dropout_p: float, training: bool):
    """(LayerNorm(s), s) with s = residual + dropout(x): the residual connection and its norm."""
    if backend == "fasttf":
        return fasttf_add_layer_norm(x, residual, norm.weight, norm.bias, eps=norm.eps,
                                     dropout_p=dropout_p, training=training)
    s = residual + F.dropout(x, dropout_p, training)
    return F.layer_norm(s, norm.normalized_shape, norm.weight, norm.bias, norm.eps), s


def dropout(backend, x, p: float, training: bool):
    """Dropout outside a residual connection (after the embedding, inside the feed-forward)."""
    if backend == "fasttf":
        return fasttf_dropout(x, p, training)
    return F.dropout(x, p, training)


def split_heads(x, num_heads):
    """(N, T, D) -> (N, H, T, D/H), a view."""
    batch, length, dim = x.shape
    return x.view(batch, length, num_heads, dim // num_heads).transpose(1, 2)


def merge_heads(x):
    """(N, H, T, D/H) -> (N, T, D)."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def attention(backend, attn: nn.MultiheadAttention, query, memory=None, *, keep=None, causal=False,
              cache=None, training=False, record=None):
    """Multi-head attention with `attn`'s weights: self-attention of `query` (N, L, D), or
    encoder-decoder attention of `query` over `memory` (N, S, D).

    keep: bool (N, S), True for a real (not padding) key. causal: query i sees keys j <= i.
    cache: a dict that keeps this layer's projected keys/values "k", "v" (N, H, S, D/H) between
    decoding steps: self-attention appends the new words' keys/values to it; encoder-decoder
    attention fills it on the first call and reads it afterwards.
    record: a list that receives the attention probabilities (N, H, L, S) (for figures).
    """
    dropout_p = attn.dropout if training else 0.0
    if backend == "torch" and cache is None and record is None:
        # Plain torch: nn.MultiheadAttention itself (bool masks there say True = masked).
        key_value = query if memory is None else memory
        causal_mask = None
        if causal:
            causal_mask = torch.ones(query.size(1), key_value.size(1), dtype=torch.bool,
                                     device=query.device).triu(1)
        padding_mask = None if keep is None else ~keep
        return attn(query, key_value, key_value, key_padding_mask=padding_mask, attn_mask=causal_mask,
                    need_weights=False)[0]

    # Projections: in_proj_weight stacks Wq, Wk, Wv (each D x D), as in nn.MultiheadAttention.
    num_heads, dim = attn.num_heads, attn.embed_dim
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    bias_q, bias_kv = (None, None) if bias is None else (bias[:dim], bias[dim:])
    if memory is None:  # self-attention: Q, K, V from the same words
        q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
        k, v = split_heads(k, num_heads), split_heads(v, num_heads)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
    else:  # encoder-decoder attention: Q from the decoder, K and V from the encoder's output
        q = F.linear(query, weight[:dim], bias_q)
        if cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = F.linear(memory, weight[dim:], bias_kv).chunk(2, dim=-1)
            k, v = split_heads(k, num_heads), split_heads(v, num_heads)
            if cache is not None:
                cache["k"], cache["v"] = k, v
    q = split_heads(q, num_heads)

    # Masks: the padding as a bool keep-mask broadcast over heads and queries; causality as
    # is_causal when queries and keys start together, else (new words after cached ones) as a
    # bool mask aligned to the last key: query i (position P + i) sees keys j <= P + i.
    length_q, length_k = q.size(2), k.size(2)
    mask = None if keep is None else keep[:, None, None, :]
    is_causal = causal and length_q > 1 and length_q == length_k
    if causal and length_q > 1 and length_q != length_k:
        mask = torch.ones(length_q, length_k, dtype=torch.bool, device=q.device).tril(length_k - length_q)
    if record is not None:
        record.append(reference.attention_probs(q, k, mask, is_causal=is_causal).detach())

    sdpa = fasttf_sdpa if backend == "fasttf" else F.scaled_dot_product_attention
    heads = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    return attn.out_proj(merge_heads(heads))


# ----------------------------------------------------------------------------------------------
# The layers. Each sublayer f is followed by add_norm. `x` is the residual stream and `h` what
# the next sublayer reads: in post-LN both are LN(x + f(h)); in pre-LN x = x + f(h) and
# h = the next sublayer's LN(x) (fused with the add), the last one the stack's final LN.


class EncoderLayer(nn.Module):
    def __init__(self, d_model, num_heads, dim_feedforward, dropout, norm_first, eps, backend):
        super().__init__()
        attention_class = FasttfMultiheadAttention if backend == "fasttf" else nn.MultiheadAttention
        self.self_attn = attention_class(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.dropout, self.norm_first, self.backend = dropout, norm_first, backend
        self.record = None  # a dict of lists while Transformer.attention_maps runs

    def feed_forward(self, h):
        return self.linear2(dropout(self.backend, F.relu(self.linear1(h)), self.dropout, self.training))

    def residual(self, out, x, norm):
        normed, s = add_norm(self.backend, out, x, norm, self.dropout, self.training)
        return (s, normed) if self.norm_first else (normed, normed)

    def forward(self, x, h, keep, next_norm):
        record = None if self.record is None else self.record["encoder self-attention"]
        out = attention(self.backend, self.self_attn, h, keep=keep, training=self.training, record=record)
        x, h = self.residual(out, x, self.norm2 if self.norm_first else self.norm1)
        x, h = self.residual(self.feed_forward(h), x, next_norm if self.norm_first else self.norm2)
        return x, h


class DecoderLayer(EncoderLayer):
    def __init__(self, d_model, num_heads, dim_feedforward, dropout, norm_first, eps, backend):
        super().__init__(d_model, num_heads, dim_feedforward, dropout, norm_first, eps, backend)
        attention_class = FasttfMultiheadAttention if backend == "fasttf" else nn.MultiheadAttention
        self.multihead_attn = attention_class(d_model, num_heads, dropout=dropout, batch_first=True)
        self.norm3 = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x, h, memory, memory_keep, next_norm, cache=None):
        record = self.record or {}
        norms = [self.norm2, self.norm3, next_norm] if self.norm_first else [self.norm1, self.norm2, self.norm3]
        out = attention(self.backend, self.self_attn, h, causal=True, training=self.training,
                        cache=None if cache is None else cache["self"],
                        record=record.get("decoder self-attention"))
        x, h = self.residual(out, x, norms[0])
        out = attention(self.backend, self.multihead_attn, h, memory, keep=memory_keep, training=self.training,
                        cache=None if cache is None else cache["cross"],
                        record=record.get("encoder-decoder attention"))
        x, h = self.residual(out, x, norms[1])
        x, h = self.residual(self.feed_forward(h), x, norms[2])
        return x, h


# ----------------------------------------------------------------------------------------------
# The model.


@dataclass
class Decoded:
    tokens: torch.Tensor  # (N, T') the predicted words, <EOS> included, <PAD> after it
    logits: torch.Tensor  # (N, T', tgt_vocab) the logits each word was chosen from


class Transformer(nn.Module):
    """The encoder-decoder of the lecture notes. See the module docstring for the math."""

    def __init__(self, src_vocab: int, tgt_vocab: int, d_model: int = 512, num_heads: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, norm_first: bool = False, max_len: int = 256, backend: str = "fasttf",
                 pad_id: int = 0, eos_id: int = 1, scale_embedding: bool = True, layer_norm_eps: float = 1e-5):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"Transformer: expected backend in {BACKENDS}, got {backend!r}")
        for name, value in (("src_vocab", src_vocab), ("tgt_vocab", tgt_vocab), ("d_model", d_model),
                            ("num_heads", num_heads), ("dim_feedforward", dim_feedforward), ("max_len", max_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Transformer: expected {name} to be a positive int, got {value!r}")
        if d_model % num_heads:
            raise ValueError(f"Transformer: expected d_model ({d_model}) divisible by num_heads ({num_heads})")
        if num_encoder_layers < 1 or num_decoder_layers < 1:
            raise ValueError("Transformer: expected at least one encoder and one decoder layer, got "
                             f"{num_encoder_layers} and {num_decoder_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Transformer: expected dropout in [0, 1), got {dropout}")
        self.backend, self.norm_first, self.max_len = backend, norm_first, max_len
        self.d_model, self.num_heads, self.pad_id, self.eos_id = d_model, num_heads, pad_id, eos_id
        self.embedding_scale = math.sqrt(d_model) if scale_embedding else 1.0
        self.config = dict(src_vocab=src_vocab, tgt_vocab=tgt_vocab, d_model=d_model, num_heads=num_heads,
                           num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
                           dim_feedforward=dim_feedforward, dropout=dropout, norm_first=norm_first,
                           max_len=max_len, pad_id=pad_id, eos_id=eos_id, scale_embedding=scale_embedding,
                           layer_norm_eps=layer_norm_eps)

        layer_args = (d_model, num_heads, dim_feedforward, dropout, norm_first, layer_norm_eps, backend)
        self.src_embedding = nn.Embedding(src_vocab, d_model)
        self.tgt_embedding = nn.Embedding(tgt_vocab, d_model)
        self.encoder_layers = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(num_decoder_layers))
        if norm_first:  # pre-LN ends each stack with a LayerNorm
            self.encoder_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
            self.decoder_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.fc = nn.Linear(d_model, tgt_vocab)  # the fully connected layer before the softmax
        self.dropout = dropout
        for embedding in (self.src_embedding, self.tgt_embedding):
            nn.init.normal_(embedding.weight, std=d_model ** -0.5)

    def with_backend(self, backend: str) -> "Transformer":
        """A new model with the same configuration and weights on the other backend."""
        twin = Transformer(**self.config, backend=backend)
        twin.load_state_dict(self.state_dict())
        p = next(self.parameters())
        return twin.to(device=p.device, dtype=p.dtype).train(self.training)

    # --- the pieces ---

    def embed(self, embedding, words, offset=0):
        """Word embedding + positional encoding (+ dropout): words (N, T) -> (N, T, D)."""
        if offset + words.size(1) > self.max_len:
            raise ValueError(f"Transformer: positions up to {offset + words.size(1)} exceed max_len={self.max_len}")
        x = add_positions(self.backend, embedding(words), offset, self.embedding_scale)
        return dropout(self.backend, x, self.dropout, self.training)

    def first_input(self, x, layers):
        """What the first sublayer of a stack reads: x (post-LN) or LN(x) (pre-LN, a lone LN)."""
        if not self.norm_first:
            return x
        norm = layers[0].norm1
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def next_norm(self, layers, index, final_norm):
        """The LayerNorm that follows layer `index` in pre-LN (the next layer's first, or the final)."""
        if not self.norm_first:
            return None
        return layers[index + 1].norm1 if index + 1 < len(layers) else final_norm

    def encode(self, src):
        """src (N, S) word ids -> (memory (N, S, D), keep (N, S): True for real words)."""
        keep = src != self.pad_id
        x = self.embed(self.src_embedding, src)
        h = self.first_input(x, self.encoder_layers)
        for index, layer in enumerate(self.encoder_layers):
            x, h = layer(x, h, keep, self.next_norm(self.encoder_layers, index, getattr(self, "encoder_norm", None)))
        return h, keep

    def decode(self, tgt, memory, memory_keep, cache=None, offset=0):
        """tgt (N, T) word ids (the first <EOS>) -> logits (N, T, tgt_vocab).

        With `cache` (from `new_cache()`), tgt holds only the new words, at positions offset...
        """
        x = self.embed(self.tgt_embedding, tgt, offset)
        h = self.first_input(x, self.decoder_layers)
        for index, layer in enumerate(self.decoder_layers):
            x, h = layer(x, h, memory, memory_keep,
                         self.next_norm(self.decoder_layers, index, getattr(self, "decoder_norm", None)),
                         cache=None if cache is None else cache[index])
        return self.fc(h)

    def forward(self, src, tgt_in, tgt_out=None):
        """src (N, S), tgt_in (N, T) -> (logits (N, T, tgt_vocab), mean cross-entropy against
        tgt_out (N, T) ignoring <PAD>, or None without tgt_out)."""
        memory, keep = self.encode(src)
        logits = self.decode(tgt_in, memory, keep)
        if tgt_out is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=self.pad_id)
        return logits, loss

    # --- decoding ---

    def new_cache(self):
        """One {"self": {}, "cross": {}} per decoder layer: the key/value cache of `decode`."""
        return [{"self": {}, "cross": {}} for _ in self.decoder_layers]

    @torch.no_grad()
    def greedy_decode(self, src, max_new_tokens: int | None = None, use_cache: bool = True) -> Decoded:
        """Translate src (N, S): start the decoder with <EOS>, pick the most likely word (the
        argmax of the softmax; never <PAD>), feed it back, until every sentence has said <EOS>.

        use_cache=False re-runs the decoder on the whole prefix at each step (the slow way, for
        tests). Each sentence's words do not depend on the others in the batch or their padding.
        """
        if max_new_tokens is None:
            max_new_tokens = self.max_len - 1
        memory, keep = self.encode(src)
        batch = src.size(0)
        words = torch.full((batch, 1), self.eos_id, dtype=torch.long, device=src.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
        cache = self.new_cache() if use_cache else None
        padding = torch.tensor([self.pad_id], device=src.device)
        all_logits = []
        for step in range(max_new_tokens):
            if use_cache:
                logits = self.decode(words[:, -1:], memory, keep, cache=cache, offset=step)[:, -1]
            else:
                logits = self.decode(words, memory, keep)[:, -1]
            next_word = logits.index_fill(-1, padding, float("-inf")).argmax(dim=-1)  # never <PAD>
            next_word = next_word.masked_fill(finished, self.pad_id)
            all_logits.append(logits)
            words = torch.cat([words, next_word[:, None]], dim=1)
            finished |= next_word == self.eos_id
            if finished.all():
                break
        return Decoded(tokens=words[:, 1:], logits=torch.stack(all_logits, dim=1))

    @torch.no_grad()
    def attention_maps(self, src, tgt_in):
        """The attention probabilities of every head for one forward pass, computed with
        fasttf.reference.attention_probs from the model's own projections:
        {"encoder self-attention": [(N, H, S, S) per layer], "decoder self-attention":
        [(N, H, T, T) per layer], "encoder-decoder attention": [(N, H, T, S) per layer]}."""
        maps = {"encoder self-attention": [], "decoder self-attention": [], "encoder-decoder attention": []}
        layers = list(self.encoder_layers) + list(self.decoder_layers)
        for layer in layers:
            layer.record = maps
        try:
            self(src, tgt_in)
        finally:
            for layer in layers:
                layer.record = None
        return maps
