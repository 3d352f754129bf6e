"""fasttf.models.Transformer on both backends, its decoding with a KV cache, and the toy tokenizer.

Every test runs strict (FASTTF_STRICT=1, tests/conftest.py): the fasttf backend may not fall back
to plain torch anywhere. Models are tiny: the Triton kernel runs under the interpreter on the CPU.
"""

import copy

import pytest
import torch
from torch import nn

from fasttf.models import Transformer, Vocab
from fasttf.models.tokenizer import EN_ES_PATH, encode_pairs, pad_batch, read_pairs, tokenize
from fasttf.testing import assert_close_to_reference
from conftest import kernel_device

SRC_VOCAB, TGT_VOCAB, PAD, EOS = 11, 13, 0, 1
SMALL = dict(d_model=16, num_heads=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=24,
             dropout=0.0, max_len=16)
BACKENDS = ["fasttf", "torch"]


def make_model(backend, seed=0, **overrides):
    """Weights drawn on the CPU (the same numbers on every machine), then moved to kernel_device()."""
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Transformer(SRC_VOCAB, TGT_VOCAB, **{**SMALL, **overrides}, backend=backend, pad_id=PAD, eos_id=EOS)
    return model.to(kernel_device())


def batch(seed=1):
    """Sentences of different lengths, padded on the right, as the demo's batches are."""
    gen = torch.Generator().manual_seed(seed)
    src_lengths, tgt_lengths = [5, 2, 4], [3, 4, 1]
    src = [torch.randint(3, SRC_VOCAB, (n,), generator=gen).tolist() + [EOS] for n in src_lengths]
    tgt = [torch.randint(3, TGT_VOCAB, (n,), generator=gen).tolist() for n in tgt_lengths]
    return pad_batch(src, PAD), pad_batch([[EOS] + t for t in tgt], PAD), pad_batch([t + [EOS] for t in tgt], PAD)


def logits_loss_grads(model, src, tgt_in, tgt_out):
    model.zero_grad()
    logits, loss = model(src, tgt_in, tgt_out)
    loss.backward()
    return logits.detach(), loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------
# The two backends


def test_both_backends_have_the_same_state_dict_keys():
    fast, plain = make_model("fasttf"), make_model("torch")
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert "encoder_layers.0.self_attn.in_proj_weight" in plain.state_dict()
    assert "decoder_layers.1.multihead_attn.out_proj.weight" in plain.state_dict()
    plain.load_state_dict(fast.state_dict())
    twin = plain.with_backend("fasttf")
    assert twin.backend == "fasttf"
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), plain.state_dict().values()))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_same_weights_give_the_same_logits_loss_and_gradients(norm_first):
    """fasttf (float32) against the torch backend in float64, within 2x the error of the torch
    backend in float32 (+ the floor): logits, loss and the gradient of every parameter."""
    fast = make_model("fasttf", norm_first=norm_first)
    plain = fast.with_backend("torch")
    truth = copy.deepcopy(plain).double()
    src, tgt_in, tgt_out = batch()

    got, want, torch32 = (logits_loss_grads(m, src, tgt_in, tgt_out) for m in (fast, truth, plain))
    assert_close_to_reference(got[0], want[0], torch32[0], name="logits")
    assert_close_to_reference(got[1], want[1], torch32[1], name="loss")
    for name in want[2]:
        assert_close_to_reference(got[2][name], want[2][name], torch32[2][name], name=f"grad {name}")


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_the_fasttf_backend_runs_fasttf_ops_and_the_torch_backend_none(norm_first, monkeypatch):
    import fasttf.models.transformer as module

    calls = {"sdpa": 0, "pe": 0, "add_ln": 0, "dropout": 0, "nn.MultiheadAttention": 0, "torch dropout": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(module, "fasttf_sdpa", counting("sdpa", module.fasttf_sdpa))
    monkeypatch.setattr(module, "fasttf_positional_encoding", counting("pe", module.fasttf_positional_encoding))
    monkeypatch.setattr(module, "fasttf_add_layer_norm", counting("add_ln", module.fasttf_add_layer_norm))
    monkeypatch.setattr(module, "fasttf_dropout", counting("dropout", module.fasttf_dropout))
    monkeypatch.setattr(nn.MultiheadAttention, "forward", counting("nn.MultiheadAttention", nn.MultiheadAttention.forward))
    monkeypatch.setattr(module.F, "dropout", counting("torch dropout", module.F.dropout))
    src, tgt_in, tgt_out = batch()
    make_model("fasttf", norm_first=norm_first)(src, tgt_in, tgt_out)[1].backward()
    # 2 encoder layers x 1 attention + 2 decoder layers x 2; 2 PE; 2 x 2 + 2 x 3 add + LayerNorm;
    # dropout after the 2 embeddings and in the 4 feed-forwards
    assert calls == {"sdpa": 6, "pe": 2, "add_ln": 10, "dropout": 6, "nn.MultiheadAttention": 0, "torch dropout": 0}
    make_model("torch", norm_first=norm_first)(src, tgt_in, tgt_out)
    torch_dropouts = calls.pop("torch dropout")  # 6, the residuals' 10, and whatever nn.MultiheadAttention calls
    assert calls == {"sdpa": 6, "pe": 2, "add_ln": 10, "dropout": 6, "nn.MultiheadAttention": 6}
    assert torch_dropouts >= 16


def test_dropout_trains_on_the_fasttf_backend():
    model = make_model("fasttf", dropout=0.2)
    src, tgt_in, tgt_out = batch()
    torch.manual_seed(0)
    first, loss = model(src, tgt_in, tgt_out)
    loss.backward()
    second, _ = model(src, tgt_in, tgt_out)
    evaluated, _ = model.eval()(src, tgt_in, tgt_out)
    assert not torch.allclose(first, second)  # a fresh dropout mask each call
    assert torch.equal(evaluated, model(src, tgt_in, tgt_out)[0])  # none in eval
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_torch_backend_is_the_transformer_of_torch_nn(norm_first):
    """The torch backend computes what torch's own nn.TransformerEncoder/Decoder layers compute
    with the same weights (our layers use their parameter names), embedding and PE in front."""
    model = make_model("torch", norm_first=norm_first).double()
    d = SMALL["d_model"]

    def layer(kind):
        cls = nn.TransformerEncoderLayer if kind == "encoder" else nn.TransformerDecoderLayer
        return cls(d, SMALL["num_heads"], SMALL["dim_feedforward"], 0.0, batch_first=True, norm_first=norm_first)

    encoder = nn.TransformerEncoder(layer("encoder"), 2, norm=nn.LayerNorm(d) if norm_first else None,
                                    enable_nested_tensor=False).double()
    decoder = nn.TransformerDecoder(layer("decoder"), 2, norm=nn.LayerNorm(d) if norm_first else None).double()
    state = model.state_dict()
    for name, stack in (("encoder", encoder), ("decoder", decoder)):
        weights = {key.replace(f"{name}_layers.", "layers."): value for key, value in state.items()
                   if key.startswith(f"{name}_layers.")}
        if norm_first:
            weights.update({f"norm.{k}": v for k, v in getattr(model, f"{name}_norm").state_dict().items()})
        stack.load_state_dict(weights)

    src, tgt_in, _ = batch()
    from fasttf.reference import positional_encoding

    def embed(embedding, words):
        return positional_encoding(embedding(words), 0, scale=d ** 0.5)

    length = tgt_in.size(1)
    memory = encoder(embed(model.src_embedding, src), src_key_padding_mask=src == PAD)
    hidden = decoder(embed(model.tgt_embedding, tgt_in), memory,
                     tgt_mask=torch.ones(length, length, dtype=torch.bool).triu(1),
                     memory_key_padding_mask=src == PAD)
    expected = model.fc(hidden)
    logits, _ = model(src, tgt_in)
    real = tgt_in != PAD
    torch.testing.assert_close(logits[real], expected[real], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Greedy decoding with the KV cache


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_cached_decoding_equals_rerunning_the_whole_prefix(backend, norm_first):
    model = make_model(backend, norm_first=norm_first).eval()
    src, _, _ = batch()
    cached = model.greedy_decode(src, max_new_tokens=6)
    rerun = model.greedy_decode(src, max_new_tokens=6, use_cache=False)
    assert cached.tokens.shape == (3, 6)  # an untrained model rarely says <EOS>: all 6 steps run
    assert torch.equal(cached.tokens, rerun.tokens)
    torch.testing.assert_close(cached.logits, rerun.logits, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_does_not_change_a_sentences_translation(backend):
    """Batched decoding of sentences of different lengths = decoding each alone, unpadded."""
    model = make_model(backend, seed=3).eval()
    src, _, _ = batch(seed=4)
    together = model.greedy_decode(src, max_new_tokens=5)
    for row in range(src.size(0)):
        alone_src = src[row:row + 1, :int((src[row] != PAD).sum())]
        alone = model.greedy_decode(alone_src, max_new_tokens=5)
        steps = alone.tokens.size(1)
        assert torch.equal(together.tokens[row, :steps], alone.tokens[0])
        torch.testing.assert_close(together.logits[row, :steps], alone.logits[0], rtol=0, atol=2e-5)


def test_greedy_decoding_stops_at_eos_and_pads_after_it():
    model = make_model("torch", seed=5).eval()
    with torch.no_grad():  # favour <EOS> a little: the sentences end after one or two words
        model.fc.bias[EOS] += 1.0
    src, _, _ = batch()
    decoded = model.greedy_decode(src, max_new_tokens=6)
    assert decoded.tokens.tolist() == [[11, EOS], [EOS, PAD], [11, EOS]]  # stops when all said <EOS>
    assert decoded.logits.shape == (3, 2, TGT_VOCAB)
    real = decoded.tokens != PAD
    assert torch.equal(decoded.logits.argmax(-1)[real], decoded.tokens[real])
    with torch.no_grad():  # <PAD> is never predicted, however likely
        model.fc.bias[PAD] += 100.0
    assert PAD not in model.greedy_decode(src, max_new_tokens=3).tokens[:, 0].tolist()


def test_attention_maps_are_probabilities_with_causality_and_padding():
    model = make_model("torch").eval()
    src, tgt_in, _ = batch()
    maps = model.attention_maps(src, tgt_in)
    assert [len(v) for v in maps.values()] == [2, 2, 2]
    for kind, layers in maps.items():
        for probs in layers:
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1], dtype=probs.dtype))
            if kind != "decoder self-attention":  # padded source words get no attention
                assert (probs.transpose(1, 3)[src == PAD] == 0).all()
    assert (maps["decoder self-attention"][0].triu(1) == 0).all()
    # the maps are the weights that torch's own module returns, averaged over heads
    layer = model.encoder_layers[0]
    x = model.embed(model.src_embedding, src)
    _, weights = layer.self_attn(x, x, x, key_padding_mask=src == PAD, need_weights=True)
    torch.testing.assert_close(maps["encoder self-attention"][0].mean(1), weights)


# ----------------------------------------------------------------------------------------------
# Sizes and errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_notes_toy_model_runs(backend):
    """The notes' sizes: 2 values a word, 1 head, one encoder and one decoder layer; "let's go"."""
    vocab_en, vocab_es = Vocab.build(["let's go", "to go"]), Vocab.build(["vamos", "ir"])
    torch.manual_seed(0)
    model = Transformer(len(vocab_en), len(vocab_es), d_model=2, num_heads=1, num_encoder_layers=1,
                        num_decoder_layers=1, dim_feedforward=2, dropout=0.0, max_len=8, backend=backend)
    src, tgt_in, tgt_out = encode_pairs([("let's go", "vamos"), ("to go", "ir")], vocab_en, vocab_es)
    logits, loss = model(src, tgt_in, tgt_out)
    assert logits.shape == (2, 2, len(vocab_es)) and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    decoded = model.eval().greedy_decode(src, max_new_tokens=3)
    assert decoded.tokens.shape[0] == 2


def test_a_large_configuration_builds():
    model = Transformer(100, 100, d_model=1024, num_heads=16, num_encoder_layers=2, num_decoder_layers=2,
                        dim_feedforward=64, backend="torch")
    assert model.encoder_layers[0].self_attn.head_dim == 64


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="cuda"), "backend"),
    (dict(d_model=10, num_heads=3), "divisible"),
    (dict(num_encoder_layers=0), "at least one"),
    (dict(dropout=1.0), "dropout"),
    (dict(max_len=0), "max_len"),
])
def test_bad_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Transformer(10, 10, **{**dict(d_model=4, num_heads=2, backend="torch"), **kwargs})


def test_sentences_longer_than_max_len_raise():
    model = make_model("torch", max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 5, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# The tokenizer and the corpus


def test_vocab_round_trip_over_the_corpus():
    pairs = read_pairs()
    english, spanish = Vocab.build(en for en, _ in pairs), Vocab.build(es for _, es in pairs)
    assert (english.pad_id, english.eos_id, english.unk_id) == (0, 1, 2)
    for en, es in pairs:
        assert english.decode(english.encode(en)) == en
        assert spanish.decode(spanish.encode(es) + [spanish.pad_id] * 2) == es
        assert english.encode(en)[-1] == english.eos_id
    assert english.encode("let's fly") == [english.ids["let's"], english.unk_id, english.eos_id]
    assert tokenize("  Let's   GO ") == ["let's", "go"]


def test_vocab_saves_and_loads(tmp_path):
    vocab = Vocab.build(["vamos a la playa", "ir"])
    vocab.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json").words == vocab.words
    with pytest.raises(ValueError, match="start with"):
        Vocab(["vamos", "<PAD>", "<EOS>", "<UNK>"])


def test_batches_put_eos_first_in_the_decoder_input():
    vocab_en, vocab_es = Vocab.build(["let's go", "to go"]), Vocab.build(["vamos a casa", "ir"])
    src, tgt_in, tgt_out = encode_pairs([("let's go", "vamos a casa"), ("to go", "ir")], vocab_en, vocab_es)
    assert vocab_en.decode(src[0]) == "let's go" and src[1, -1].item() == vocab_en.eos_id
    assert tgt_in[:, 0].tolist() == [vocab_es.eos_id] * 2
    assert torch.equal(tgt_in[0, 1:], tgt_out[0, :-1])
    assert tgt_out[1].tolist() == [vocab_es.ids["ir"], vocab_es.eos_id, vocab_es.pad_id, vocab_es.pad_id]


def test_the_corpus_has_the_notes_pairs_and_a_fair_held_out_split():
    train, test = read_pairs(EN_ES_PATH, "train"), read_pairs(EN_ES_PATH, "test")
    assert ("let's go", "vamos") in train and ("to go", "ir") in train
    assert len(train) + len(test) >= 300 and len(test) >= 20
    assert not set(train) & set(test)
    english = {en for en, _ in train + test}
    assert len(english) == len(train) + len(test)  # one translation per English sentence
    words_en = {w for en, _ in train for w in en.split()}
    words_es = {w for _, es in train for w in es.split()}
    for en, es in test:  # held-out sentences are new combinations of known words
        assert set(en.split()) <= words_en and set(es.split()) <= words_es
