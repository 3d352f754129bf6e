"""fasttf's models. PLACEHOLDER until issue 6 lands: fasttf.models.Transformer."""
