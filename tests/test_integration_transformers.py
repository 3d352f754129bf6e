"""attn_implementation="fasttf" in Hugging Face transformers models (fasttf.integrations.transformers).

Tiny random models built here (no downloads), one per architecture the integration claims:
Llama (GQA, causal), Mistral (sliding window), BERT (padding), GPT-2, T5 (learned relative bias,
encoder-decoder), BART (cross attention), ViT. Each: logits against the model's own "sdpa" and
"eager" implementations by the accuracy rule (a float64 "eager" copy is the reference), one
training step's gradients likewise, and greedy generate() with the KV cache token-identical to
"sdpa" for the generative ones. Strict mode (conftest) proves the kernel ran, and a spy counts its
calls. The exceptions, each marked: T5's training step (its learned bias is a float mask that
requires grad, which today takes fasttf.reference) runs non-strict.
"""

import pytest
import torch
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface

import fasttf
import fasttf.integrations.transformers as fasttf_hf
from conftest import kernel_device
from fasttf.testing import assert_close_to_reference

DEVICE = kernel_device()
VOCAB, LENGTH, BATCH = 48, 8, 2
TINY = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4)  # head dim 8


# ----------------------------------------------------------------------------------------------
# The models: (Auto class, config, inputs); every dropout 0 so that gradients compare


def _padding(lengths, left=False):
    """A (len(lengths), LENGTH) attention mask: `n` real tokens a row, the padding left or right."""
    mask = torch.zeros(len(lengths), LENGTH, dtype=torch.long)
    for row, n in enumerate(lengths):
        if left:
            mask[row, LENGTH - n:] = 1
        else:
            mask[row, :n] = 1
    return mask


def _causal_lm_inputs(pad):
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH))
    mask = _padding([LENGTH, LENGTH - 3], left=True) if pad else torch.ones(BATCH, LENGTH, dtype=torch.long)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, num_key_value_heads=2, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2, **TINY)
    return transformers.AutoModelForCausalLM, config, _causal_lm_inputs(pad=False)


def mistral():  # a window of 3 keys over 8 tokens: the window cuts
    config = transformers.MistralConfig(vocab_size=VOCAB, num_hidden_layers=1, num_key_value_heads=2, sliding_window=3,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, **TINY)
    return transformers.AutoModelForCausalLM, config, _causal_lm_inputs(pad=True)


def gemma2():  # sliding (window 3) and full layers alternating, scaling by query_pre_attn_scalar; no softcap;
    # transformers refuses "sdpa" for Gemma 2: compared with "eager" only, without padding (float64 eager
    # turns rows with every key masked into NaN)
    config = transformers.Gemma2Config(vocab_size=VOCAB, num_hidden_layers=2, num_key_value_heads=2, head_dim=8,
                                       sliding_window=3, query_pre_attn_scalar=16, attn_logit_softcapping=None,
                                       final_logit_softcapping=None, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                       **TINY)
    return transformers.AutoModelForCausalLM, config, _causal_lm_inputs(pad=False)


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=4, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.AutoModelForCausalLM, config, _causal_lm_inputs(pad=True)


def bert():  # right padding, bidirectional
    config = transformers.BertConfig(vocab_size=VOCAB, num_hidden_layers=1, max_position_embeddings=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **TINY)
    ids, mask = torch.randint(3, VOCAB, (BATCH, LENGTH)), _padding([LENGTH, LENGTH - 3])
    return transformers.AutoModelForMaskedLM, config, dict(input_ids=ids, attention_mask=mask,
                                                          labels=ids.masked_fill(mask == 0, -100))


def _seq2seq_inputs():
    ids, mask = torch.randint(3, VOCAB, (BATCH, LENGTH)), _padding([LENGTH, LENGTH - 3])
    return dict(input_ids=ids, attention_mask=mask, labels=torch.randint(3, VOCAB, (BATCH, 5)))


def t5():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1,
                                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   dropout_rate=0.0, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    return transformers.AutoModelForSeq2SeqLM, config, _seq2seq_inputs()


def bart():
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                     decoder_ffn_dim=48, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                                     activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=2, forced_eos_token_id=None)
    return transformers.AutoModelForSeq2SeqLM, config, _seq2seq_inputs()


def vit():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, num_hidden_layers=1, num_labels=3,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **TINY)
    return (transformers.AutoModelForImageClassification, config,
            dict(pixel_values=torch.randn(BATCH, 3, 8, 8), labels=torch.tensor([0, 2])))


MODELS = {"llama": llama, "mistral": mistral, "gemma2": gemma2, "gpt2": gpt2, "bert": bert, "t5": t5, "bart": bart, "vit": vit}
GENERATIVE = ["llama", "mistral", "gemma2", "gpt2", "t5", "bart"]
BASELINES = {"gemma2": ("eager",)}  # the implementations each model is compared with; default sdpa and eager


def build(name, attn_implementation="fasttf"):
    torch.manual_seed(0)
    auto, config, inputs = MODELS[name]()
    model = auto.from_config(config, attn_implementation=attn_implementation).to(DEVICE)
    return model, {key: value.to(DEVICE) for key, value in inputs.items()}


def twin(model, name, attn_implementation, dtype=torch.float32):
    """The same weights on another attention implementation, built as such: set_attn_implementation
    does not reach T5's encoder and decoder stacks in transformers 5.17."""
    other, _ = build(name, attn_implementation)
    other.load_state_dict(model.state_dict())
    other.to(dtype).train(model.training)
    assert {m.config._attn_implementation for m in other.modules() if hasattr(m, "config")} == {attn_implementation}
    return other


def _cast(inputs, dtype):
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in inputs.items()}


def _run(model, inputs, grad):
    """(logits at the attended positions, loss, gradients by name) of one training-mode call."""
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        out = model(**_cast(inputs, model.dtype))
        if grad:
            out.loss.backward()
    logits = out.logits
    if "attention_mask" in inputs and logits.dim() == 3 and logits.size(1) == LENGTH:  # decoder-only: real tokens
        logits = logits[inputs["attention_mask"].bool()]
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None} if grad else {}
    return logits.detach(), out.loss.detach(), grads


def _compare(name, grad, dtype=torch.float32):
    model, inputs = build(name)
    model.to(dtype).train()  # every dropout is 0: training mode, deterministic numbers
    # the float64 truth runs "sdpa": float64 "eager" turns rows with every key masked into NaN
    baselines = BASELINES.get(name, ("sdpa", "eager"))
    expected = _run(twin(model, name, baselines[0], torch.float64), inputs, grad)
    ours = _run(model, inputs, grad)
    for implementation in baselines:
        theirs = _run(twin(model, name, implementation, dtype), inputs, grad)
        assert_close_to_reference(ours[0], expected[0], theirs[0], f"{name} logits vs {implementation}")
        for param, gradient in expected[2].items():
            assert_close_to_reference(ours[2][param], gradient, theirs[2][param],
                                      f"{name} grad {param} vs {implementation}")
    assert set(ours[2]) == set(expected[2])


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_sdpa_and_eager(name, attention_backend, kernel_calls):
    _compare(name, grad=False)  # without grad: T5's learned bias is then a plain float mask
    assert kernel_calls


@pytest.mark.parametrize("name", ["llama", "bart"])
def test_bfloat16_logits_and_gradients_match(name, attention_backend, kernel_calls):
    _compare(name, grad=True, dtype=torch.bfloat16)
    assert kernel_calls


@pytest.mark.parametrize("name", [n for n in MODELS if n != "t5"])
def test_training_step_gradients_match(name, attention_backend, kernel_calls):
    _compare(name, grad=True)
    assert kernel_calls


def test_t5_training_step_gradients_match(attention_backend, kernel_calls):
    """The learned position bias is a float mask that requires grad: its gradient comes from the
    kernel (strict: no fallback)."""
    _compare("t5", grad=True)
    assert kernel_calls


@pytest.mark.parametrize("name", GENERATIVE)
def test_greedy_generate_with_cache_matches_sdpa(name, attention_backend, kernel_calls):
    model, inputs = build(name)
    model.eval()
    inputs.pop("labels")
    if name in ("llama", "mistral", "gemma2"):  # left-padded prompts: a mask at every step
        inputs["attention_mask"] = _padding([LENGTH, LENGTH - 2], left=True).to(DEVICE)
    options = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    ours = model.generate(**inputs, **options)
    assert any(call["length_q"] == 1 for call in kernel_calls)  # decoding steps, one query over the cache
    assert torch.equal(ours, twin(model, name, BASELINES.get(name, ("sdpa",))[0]).generate(**inputs, **options))


# ----------------------------------------------------------------------------------------------
# Registration and the three ways to select "fasttf"


def test_register_again_is_harmless():
    assert fasttf_hf.register() == fasttf_hf.register() == "fasttf"
    assert AttentionInterface._global_mapping["fasttf"] is fasttf_hf.attention_forward
    assert AttentionMaskInterface._global_mapping["fasttf"] is transformers.masking_utils.sdpa_mask
    assert "fasttf" in AttentionInterface().valid_keys()


def test_set_attn_implementation_and_from_pretrained(tmp_path, kernel_calls):
    model, inputs = build("llama", attn_implementation="sdpa")
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        assert not kernel_calls
        model.set_attn_implementation("fasttf")
        assert model.config._attn_implementation == "fasttf"
        ours = model(**inputs).logits
        assert kernel_calls
        assert_close_to_reference(ours, expected, expected, "set_attn_implementation logits")
        model.save_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fasttf").to(DEVICE).eval()
        assert loaded.config._attn_implementation == "fasttf"
        calls = len(kernel_calls)
        assert torch.equal(loaded(**inputs).logits, ours) and len(kernel_calls) > calls


# ----------------------------------------------------------------------------------------------
# What models pass: causal without a mask, GQA without copies, caches, dropout, weights, refusals


def test_llama_runs_causal_gqa_without_mask_or_copies(kernel_calls):
    model, inputs = build("llama")
    with torch.no_grad():
        model.eval()(**inputs)
    assert kernel_calls and all(call["attn_mask"] is None and call["is_causal"] and call["enable_gqa"]
                                and (call["heads"], call["heads_kv"]) == (4, 2) for call in kernel_calls)


@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated:FutureWarning")
def test_several_new_tokens_over_a_cache_match_sdpa(kernel_calls):
    """Lq = 2 new tokens over Lk = 6 cached + 2 new keys (bottom-right causal): transformers builds
    the mask for it; fasttf's top-left is_causal is never used there."""
    model, inputs = build("llama")
    ids = inputs["input_ids"]
    outputs = {}
    with torch.no_grad():
        for implementation in ("fasttf", "sdpa"):
            other = twin(model, "llama", implementation).eval()
            cache = other(input_ids=ids[:, :6], use_cache=True).past_key_values
            outputs[implementation] = other(input_ids=ids[:, 6:], past_key_values=cache).logits
    assert any(call["length_q"] == 2 and call["length_k"] == 8 and call["attn_mask"] is not None
               for call in kernel_calls)
    assert not any(call["is_causal"] and call["length_q"] != call["length_k"] for call in kernel_calls)
    torch.testing.assert_close(outputs["fasttf"], outputs["sdpa"], rtol=1e-5, atol=1e-5)


def test_static_cache_generate_matches_sdpa(kernel_calls):
    """Prefill into a static cache longer than the prompt: no mask, is_causal, the empty slots dropped."""
    model, inputs = build("llama")
    model.eval()
    options = dict(input_ids=inputs["input_ids"], max_new_tokens=3, do_sample=False, pad_token_id=0,
                   cache_implementation="static")
    ours = model.generate(**options)
    assert torch.equal(ours, twin(model, "llama", "sdpa").generate(**options))
    assert any(call["is_causal"] and call["length_q"] == call["length_k"] == LENGTH for call in kernel_calls)


def test_dropout_in_training_only(kernel_calls):
    model, inputs = build("llama")
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    ids = inputs["input_ids"]
    with torch.no_grad():
        logits = []
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            logits.append(model.train()(input_ids=ids).logits)
        assert torch.equal(logits[0], logits[1]) and not torch.equal(logits[0], logits[2])
        assert {call["dropout_p"] for call in kernel_calls} == {0.5}
        evaluated = model.eval()(input_ids=ids).logits
        assert kernel_calls[-1]["dropout_p"] == 0.0
        torch.testing.assert_close(evaluated, twin(model, "llama", "sdpa")(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_output_attentions_match_eager(name, kernel_calls):
    """Weights (B, H, Lq, Lk) per layer, for GQA (Llama) too, beside the kernel's output."""
    model, inputs = build(name)
    model.eval()
    inputs.pop("labels")
    with torch.no_grad():
        ours = model(**inputs, output_attentions=True)
        expected = twin(model, name, "eager", torch.float64)(**_cast(inputs, torch.float64), output_attentions=True)
        theirs = twin(model, name, "eager")(**inputs, output_attentions=True)
    layers = model.config.num_hidden_layers
    assert kernel_calls and all(call["weights"] for call in kernel_calls) and len(ours.attentions) == layers
    for layer in range(layers):
        assert ours.attentions[layer].shape == (BATCH, 4, LENGTH, LENGTH)
        assert_close_to_reference(ours.attentions[layer], expected.attentions[layer], theirs.attentions[layer],
                                  f"{name} attentions {layer}")
    assert_close_to_reference(ours.logits, expected.logits, theirs.logits, "logits with output_attentions")


class _Attention(torch.nn.Module):
    is_causal = True


def _qkv(length_q, length_k, heads=4, heads_kv=2):
    torch.manual_seed(0)
    return (torch.randn(1, heads, length_q, 8, device=DEVICE), torch.randn(1, heads_kv, length_k, 8, device=DEVICE),
            torch.randn(1, heads_kv, length_k, 8, device=DEVICE))


@pytest.mark.parametrize("length_q, length_k", [(6, 6), (1, 6)])
def test_sliding_window_without_a_mask_is_applied(length_q, length_k, kernel_calls):
    """A call with sliding_window and no mask (not what transformers' own masks produce, but what a
    direct caller may pass): the window is built here, never ignored."""
    query, key, value = _qkv(length_q, length_k)
    out, weights = fasttf_hf.attention_forward(_Attention().eval(), query, key, value, None, sliding_window=2)
    q_pos = torch.arange(length_k - length_q, length_k, device=DEVICE)[:, None]
    distance = q_pos - torch.arange(length_k, device=DEVICE)[None, :]
    allowed = (distance >= 0) & (distance < 2)
    expected = fasttf.reference.scaled_dot_product_attention(query.double(), key.double(), value.double(), allowed,
                                                             enable_gqa=True)
    assert weights is None and out.shape == (1, length_q, 4, 8) and kernel_calls
    torch.testing.assert_close(out, expected.transpose(1, 2).float(), rtol=1e-5, atol=1e-5)


def test_softcap_and_sinks_raise_clearly():
    config = transformers.Gemma2Config(vocab_size=VOCAB, num_hidden_layers=1, num_key_value_heads=2, head_dim=8,
                                       attn_logit_softcapping=50.0, **TINY)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="fasttf").to(DEVICE)
    with pytest.raises(ValueError, match="soft-capping.*attn_logit_softcapping"):
        model(input_ids=torch.randint(0, VOCAB, (1, 4), device=DEVICE))
    query, key, value = _qkv(4, 4)
    for name in ("s_aux", "sinks"):
        with pytest.raises(ValueError, match=f"attention sinks \\({name}"):
            fasttf_hf.attention_forward(_Attention(), query, key, value, None, **{name: torch.zeros(4)})
    with pytest.raises(ValueError, match="bidirectional"):
        module = _Attention()
        module.is_causal = False
        fasttf_hf.attention_forward(module, query, key, value, None, sliding_window=2)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float64"])
@pytest.mark.parametrize("bias", [False, True])
def test_masks_and_position_bias_as_eager_adds_them(mask_kind, bias, kernel_calls):
    """A 4-D bool or float mask (any float dtype: cast to the query's), T5's position_bias, both,
    causal without a mask: the output of eager's formula softmax(q k^T * scale + bias + mask) v."""
    query, key, value = _qkv(5, 5, heads=4, heads_kv=4)
    allowed = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    allowed[..., 0] = True  # every row keeps a key
    query, key, value = (t.expand(2, -1, -1, -1).contiguous() for t in (query, key, value))
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    mask = {"none": None, "bool": allowed, "float64": additive}[mask_kind]
    position_bias = torch.randn(1, 4, 5, 5) if bias else None
    truth = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    if mask_kind == "none":  # the module is causal: no mask, is_causal
        truth = truth.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    else:
        truth = additive
    if bias:
        truth = truth + position_bias.double()
    scores = query.double() @ key.double().transpose(-2, -1) * 0.5 + truth.to(DEVICE)
    expected = (scores.softmax(-1) @ value.double()).transpose(1, 2)
    mask = None if mask is None else mask.to(DEVICE)
    position_bias = None if position_bias is None else position_bias.to(DEVICE)
    out, _ = fasttf_hf.attention_forward(_Attention().eval(), query, key, value, mask, scaling=0.5,
                                         position_bias=position_bias)
    assert len(kernel_calls) == 1 and kernel_calls[0]["is_causal"] == (mask_kind == "none" and not bias)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    """The integration traces without graph breaks (fasttf's attention is a torch.library op);
    aot_eager keeps the test quick and still runs the op's registered autograd."""
    model, inputs = build("llama")
    expected = _run(model, inputs, grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ours = _run(compiled, inputs, grad=True)
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-5, atol=1e-6)
    grads = {name.removeprefix("_orig_mod."): gradient for name, gradient in ours[2].items()}
    assert grads.keys() == expected[2].keys()
    for param, gradient in expected[2].items():
        torch.testing.assert_close(grads[param], gradient, rtol=1e-5, atol=1e-6)
