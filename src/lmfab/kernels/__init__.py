"""Fused kernels (Triton, FlexAttention), each with its reference implementation beside it.

- :mod:`lmfab.kernels.cross_entropy`: output projection + cross-entropy, the logits' gradient
  made in forward (a Triton row kernel; PyTorch off CUDA);
- :mod:`lmfab.kernels.bias_gelu`: the MLP's bias + GELU with its bias gradient;
- :mod:`lmfab.kernels.alibi`: ALiBi attention through FlexAttention.

They depend on torch only; the model picks them through
:class:`lmfab.models.execution.Kernels`.
"""
