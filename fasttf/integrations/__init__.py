"""fasttf inside other libraries. Each integration is a module of its own, imported on demand:

    import fasttf.integrations.transformers   # registers attn_implementation="fasttf" with Hugging Face transformers
"""
