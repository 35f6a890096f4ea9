"""Real low-bit inference: packed weights and INT8 / FP8 / INT4 kernels.

* :mod:`.reference` — storage conventions and plain-PyTorch reference implementations (the test oracle).
* :mod:`.ops` — ``torch.library`` custom ops (``diffquant::qconv``, ``diffquant::fp8_attention_fp8``,
  ``diffquant::flash_attention``, ...) with fake implementations for ``torch.compile``; Triton / Gluon on CUDA, the
  reference elsewhere.
* :mod:`.triton_conv` — the Triton implicit-GEMM kernel (int8 / FP8 / bf16 activations; int8, FP8
  or packed 4-bit weights); imported only when Triton is installed (GPU machines). :mod:`.triton_conv_tma` — its
  TMA variants; :mod:`.triton_attention` — FP8 FlashAttention-style attention; :mod:`.tuning` —
  per-shape block configs.
* :mod:`.modules` — the converted layers; :func:`diffquant.convert.convert` builds them.
"""
from diffquant.kernels.ops import flash_attention, fp8_attention, qconv, qconv_ref, triton_available

__all__ = ["flash_attention", "fp8_attention", "qconv", "qconv_ref", "triton_available"]
