"""PLACEHOLDER until issue 3 lands: the Triton attention op."""


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    raise NotImplementedError("fasttf.scaled_dot_product_attention: issue 3 in progress")
