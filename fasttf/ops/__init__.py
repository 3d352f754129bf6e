"""fasttf's ops: each a torch.autograd.Function over its kernels, registered as torch.ops.fasttf.*."""
