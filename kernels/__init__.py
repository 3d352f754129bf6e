"""fasttf's Triton kernels, installed as the package fasttf.kernels (one kernel a file)."""
