"""Models out of lmfab: Hugging Face folders and GGUF files.

- :mod:`lmfab.export.fold`: muP multipliers and the 1/d_head attention scale folded into the
  weights, so that a standard architecture computes the same logits (shared by every format);
- :mod:`lmfab.export.hf`: ``lmfab export hf``, a folder ``transformers`` loads as GPT-2,
  Llama or GPT-NeoX (or with bundled modeling code for ALiBi + SwiGLU);
- :mod:`lmfab.export.hf_import`: ``lmfab import hf``, a local GPT-2 / Llama / GPT-NeoX folder
  into an lmfab run folder for continued pre-training.

Nothing heavy is imported here: each command imports its own module.
"""
