"""Real low-bit layers: weights stored as int8 / FP8 / packed int4 with their scales, activations
quantized once per call (plain tensor ops, so ``torch.compile`` fuses them into the producer of
the input) and fed to the ``diffquant::qconv`` op; FP8 Linear / 1x1 conv can use ``torch._scaled_mm``.

Built by :func:`diffquant.convert.convert` from calibrated fake-quant layers; storage conventions
in :mod:`diffquant.kernels.reference`.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import nn

from diffquant.kernels import ops
from diffquant.kernels.reference import (fp8_dynamic_scale, fp8_token_scales, pad_correction, quantize_act_fp8,
                                       quantize_act_int8)

BACKENDS = ("int8", "fp8", "w4a8", "w4a16")


class _KeepStorage:
    """dtype / memory-format conversions of the model (``model.to(torch.bfloat16)``,
    ``.to(memory_format=torch.channels_last)``) must not touch packed weights and fp32 scales: only
    device moves apply to these buffers."""

    def _apply(self, fn, recurse=True):
        for key, buf in list(self._buffers.items()):
            if buf is None:
                continue
            moved = fn(buf)
            same = moved.dtype == buf.dtype and moved.is_contiguous()
            self._buffers[key] = moved if same else buf.to(moved.device)
        if recurse:
            for m in self.children():
                m._apply(fn)
        return self


class _Part(_KeepStorage, nn.Module):
    """One slice ``[lo, hi)`` of the input channels with its weight and activation qparams (a split-
    shortcut layer has two)."""

    def __init__(self, lo: int, hi: int, w: torch.Tensor, w_scale: torch.Tensor, a_scale: Optional[torch.Tensor],
                 corr: Optional[torch.Tensor], wzp: Optional[torch.Tensor], a_zp: int, w4: bool):
        super().__init__()
        self.lo, self.hi, self.a_zp, self.w4 = lo, hi, int(a_zp), w4
        self.register_buffer("w", w.contiguous())
        self.register_buffer("w_scale", w_scale.float().contiguous())
        self.register_buffer("a_scale", None if a_scale is None else a_scale.float().reshape(1))
        self.register_buffer("corr", None if corr is None else corr.to(torch.int32))
        self.register_buffer("wzp", None if wzp is None else wzp.to(torch.int32))
        # int8 weights with an activation zero point: per-tap weight sums for the kernel's padding fix-up
        use_pc = self.a_zp != 0 and not w4 and wzp is None and w.dtype == torch.int8
        self.register_buffer("pad_corr", pad_correction(w, self.a_zp) if use_pc else None)


class LowBitLayer(_KeepStorage, nn.Module):
    """A converted Conv2d (``kind='conv'``) or Linear (``kind='linear'``)."""

    def __init__(self, kind: str, backend: str, in_channels: int, out_channels: int, kernel_size=(1, 1),
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), bias: Optional[torch.Tensor] = None,
                 name: str = ""):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; allowed: {BACKENDS}")
        self.kind, self.backend, self.layer_name = kind, backend, name
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (
            tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.parts = nn.ModuleList()
        # activation quantization, per input channel (two values in a split layer)
        self.act = "none"  # "int" | "fp8" | "fp8_dynamic" | "fp8_token" | "none"
        self.qmin = self.qmax = self.offset = 0
        # "triton" | "scaled_mm" (FP8 single-part 1x1 / linear: cuBLAS with row-wise scales) | "scaled_mm_tw" (the
        # same with tensor-wise scales, the per-channel weight scales applied to the output: set_fp8_gemm)
        self.fp8_gemm = "triton"

    def set_act_int(self, inv_scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, offset: int) -> None:
        self.act, self.qmin, self.qmax, self.offset = "int", qmin, qmax, offset
        self.register_buffer("act_inv_scale", inv_scale.float().reshape(1, -1, 1, 1).contiguous())
        self.register_buffer("act_zp", zero_point.float().reshape(1, -1, 1, 1).contiguous())

    def set_act_fp8(self, scale: Optional[torch.Tensor], dynamic: str = "tensor") -> None:
        """Static FP8 activation scale(s), or (``scale=None``) dynamic ones: one per tensor (``dynamic="tensor"``) or one
        per token, i.e. per row of the layer's GEMM (``"token"``; Linear and 1x1 conv with stride 1 and no padding)."""
        if scale is None:
            if dynamic not in ("tensor", "token"):
                raise ValueError(f"dynamic={dynamic!r}; allowed: 'tensor', 'token'")
            if dynamic == "token" and not self._is_gemm():
                raise ValueError(f"per-token FP8 scales need a Linear or a 1x1/stride-1/unpadded conv; {self.layer_name} is "
                                 f"a {self.kernel_size} conv with stride {self.stride}, padding {self.padding}")
            self.act = "fp8_dynamic" if dynamic == "tensor" else "fp8_token"
        else:
            self.act = "fp8"
            self.register_buffer("act_scale", scale.float().reshape(1, -1, 1, 1).contiguous())

    def _is_gemm(self) -> bool:
        return self.kind == "linear" or (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0))

    @property
    def weight_bytes(self) -> int:
        n = sum(b.numel() * b.element_size() for p in self.parts for b in p.buffers())
        return n + (self.bias.numel() * 4 if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"{self.kind}, {self.backend}, {self.in_channels}->{self.out_channels}, k={self.kernel_size}, "
                f"s={self.stride}, p={self.padding}, parts={len(self.parts)}, act={self.act}, gemm={self.fp8_gemm}")

    def _quantize_input(self, x4: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.act == "int":
            return quantize_act_int8(x4, self.act_inv_scale, self.act_zp, self.qmin, self.qmax, self.offset), None
        if self.act == "fp8":
            return quantize_act_fp8(x4, self.act_scale), None
        if self.act == "fp8_dynamic" and len(self.parts) > 1:  # a split layer: one scale per part, [parts]
            s = torch.cat([fp8_dynamic_scale(x4[:, p.lo:p.hi]) for p in self.parts])
            per_ch = torch.cat([s[i:i + 1].expand(p.hi - p.lo) for i, p in enumerate(self.parts)]).view(1, -1, 1, 1)
            return quantize_act_fp8(x4, per_ch), s
        if self.act == "fp8_dynamic":
            s = fp8_dynamic_scale(x4)
            return quantize_act_fp8(x4, s), s
        if self.act == "fp8_token":  # one scale per pixel / token: [N*H*W, 1], rows in NHWC order
            x2 = x4.permute(0, 2, 3, 1).reshape(-1, x4.shape[1])
            s = fp8_token_scales(x2)
            xq = quantize_act_fp8(x2, s).reshape(x4.shape[0], x4.shape[2], x4.shape[3], x4.shape[1]).permute(0, 3, 1, 2)
            return xq, s
        return x4, None

    def forward(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` in float; or, for a layer with a static input quantization (``act`` "fp8" or "int"), its already
        quantized values (e4m3 x / scale per channel, or the int8 codes of :func:`.reference.quantize_act_int8`): its
        producer fused the quantization (the FP8 attention for ``to_out``, a fused group norm for a ResNet conv). Then
        ``out_dtype`` is needed. ``residual`` (shaped like the output) is added to it, in the conv kernel's epilogue
        where the layer runs ``diffquant::qconv`` (a ResNet block's shortcut: one pass fewer)."""
        prequantized = (x.dtype == torch.float8_e4m3fn and self.act == "fp8") or (x.dtype == torch.int8 and
                                                                                  self.act == "int")
        if prequantized and out_dtype is None:
            raise ValueError(f"{self.layer_name}: a quantized input needs the output dtype (out_dtype=...)")
        out_dtype = out_dtype or x.dtype
        if self.kind == "linear":
            lead = x.shape[:-1]
            x4 = x.reshape(-1, x.shape[-1])[:, :, None, None]
        else:
            x4 = x
        xq, dyn_scale = (x4, None) if prequantized else self._quantize_input(x4)
        if self.kind == "conv" and not xq.is_contiguous(memory_format=torch.channels_last):
            xq = xq.contiguous(memory_format=torch.channels_last)
        if residual is not None and self.kind == "linear":
            residual = residual.reshape(-1, self.out_channels)[:, :, None, None]
        if self.fp8_gemm in ("scaled_mm", "scaled_mm_tw") and len(self.parts) == 1:
            y = self._scaled_mm(xq, dyn_scale, out_dtype)
            y = y if residual is None else y + residual
        elif self.act == "fp8_token":  # no per-row scale in diffquant::qconv: scale the rows of its output
            p = self.parts[0]
            y = ops.qconv(xq, p.w, p.w_scale, None, None, None, None, None, 0, list(self.stride), list(self.padding),
                          list(self.dilation), False, torch.float32, None)
            y = y * dyn_scale.view(xq.shape[0], xq.shape[2], xq.shape[3], 1).permute(0, 3, 1, 2)
            if self.bias is not None:
                y = y + self.bias.view(1, -1, 1, 1)
            y = (y if residual is None else y + residual).to(out_dtype)
        else:
            pieces = [xq] if len(self.parts) == 1 else [xq[:, p.lo:p.hi] for p in self.parts]
            y = self._qconv_parts(pieces, dyn_scale, out_dtype, residual)
        if self.kind == "linear":
            return y.reshape(*lead, self.out_channels)
        return y

    def _qconv_parts(self, pieces: list, dyn_scale: Optional[torch.Tensor], out_dtype: torch.dtype,
                     residual: Optional[torch.Tensor]) -> torch.Tensor:
        if dyn_scale is None and self.split_gemm_scaled_mm(pieces[0]):
            return self._scaled_mm_parts(pieces, out_dtype, residual)
        if residual is None and dyn_scale is None and self.fuses_parts(pieces):
            p0, p1 = self.parts
            return ops.qconv_sc(pieces[0], p0.w, p0.w_scale, p0.a_scale, self.bias, [pieces[1]], [p1.w],
                                [p1.w_scale], [p1.a_scale], None, list(self.padding), out_dtype)
        y = residual  # the first part's kernel adds it; each later part adds the sum so far
        for i, (p, xs) in enumerate(zip(self.parts, pieces)):
            a_scale = p.a_scale if dyn_scale is None else dyn_scale if len(self.parts) == 1 else dyn_scale[i:i + 1]
            y = ops.qconv(xs, p.w, p.w_scale, a_scale, p.corr, p.wzp, self.bias if i == 0 else None, y,
                          p.a_zp, list(self.stride), list(self.padding), list(self.dilation), p.w4, out_dtype,
                          p.pad_corr)
        return y

    def split_gemm_scaled_mm(self, x: torch.Tensor) -> bool:
        """Whether a split layer's parts run as cuBLAS FP8 GEMMs (one ``torch._scaled_mm`` per part, the bf16 results
        summed) instead of one ``diffquant::qconv`` per part: with ``DIFFQUANT_SPLIT_GEMM=scaled_mm``, for an FP8 1x1
        / stride-1 / unpadded conv with static input scales whose parts and output widths are multiples of 16 (an up
        block's shortcut on ``(h, skip)``), where row-wise ``_scaled_mm`` runs. The per-part qconv kernel is at K =
        320-1,280 two to three times slower than cuDNN's bf16 1x1 conv (``benchmarks/results/qconv_tune_rows_tma.json``),
        cuBLAS's FP8 GEMMs of the same sizes are not. An A/B switch: slower on SD-1.5 b8 (15.25 against 15.06 ms; H200,
        2026-11-29, BENCHMARKS.md "Kernels, thirteenth measurement"): the GEMMs and the sum (one more elementwise
        pass, which the qconv path folds into its second kernel) cost more than the qconv parts."""
        mode = os.environ.get("DIFFQUANT_SPLIT_GEMM", "")
        if mode not in ("", "qconv", "scaled_mm"):
            raise ValueError(f"DIFFQUANT_SPLIT_GEMM={mode!r}: 'qconv' (the default) or 'scaled_mm'")
        return (mode == "scaled_mm" and len(self.parts) > 1 and self.act == "fp8" and self._is_gemm()
                and self.kind == "conv" and self.out_channels % 16 == 0
                and all((p.hi - p.lo) % 16 == 0 and not p.w4 for p in self.parts) and scaled_mm_works(x.device))

    def _scaled_mm_parts(self, pieces: list, out_dtype: torch.dtype, residual: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`_qconv_parts` as one row-wise cuBLAS FP8 GEMM per part (see :meth:`split_gemm_scaled_mm`): each
        part's bf16 output (the bias on the first), summed in fp32 with ``residual``, rounded once to ``out_dtype``."""
        nb, _, h, w = pieces[0].shape
        total = None
        for i, (p, xq) in enumerate(zip(self.parts, pieces)):
            c = p.hi - p.lo
            a2 = _row_major(xq.permute(0, 2, 3, 1).reshape(-1, c))
            s_a = p.a_scale.reshape(1, 1).expand(a2.shape[0], 1).contiguous()
            bias = self.bias.to(torch.bfloat16) if i == 0 and self.bias is not None else None
            y = torch._scaled_mm(a2, p.w.view(self.out_channels, c).t(), scale_a=s_a, scale_b=p.w_scale.view(1, -1),
                                 bias=bias, out_dtype=torch.bfloat16).float()
            total = y if total is None else total + y
        y = total.reshape(nb, h, w, self.out_channels).permute(0, 3, 1, 2)
        if residual is not None:
            y = y + residual.float()
        return y.to(out_dtype)

    def fuses_parts(self, pieces: Sequence[torch.Tensor]) -> bool:
        """Whether this split layer's two parts run as one ``diffquant::qconv_sc`` (the first part as its conv, the
        second as its one source: one kernel, one accumulator, no intermediate output): unless
        ``DIFFQUANT_SPLIT_FUSE=0`` (``1`` is the default), an FP8 conv with static input scales that keeps the size
        (stride 1, dilation 1, square kernel, padding (k - 1) / 2), fed its two quantized pieces (an up block's conv1
        or shortcut on ``(h, skip)``). The op sends calls whose kernel grid would not fill the GPU to the separate
        qconv calls (:func:`.triton_conv.sc_composed_reason`)."""
        mode = os.environ.get("DIFFQUANT_SPLIT_FUSE", "1")
        if mode not in ("0", "1"):
            raise ValueError(f"DIFFQUANT_SPLIT_FUSE={mode!r}: 0 or 1")
        k = self.kernel_size
        return (mode == "1" and self.kind == "conv" and self.act == "fp8" and len(self.parts) == 2 == len(pieces)
                and k[0] == k[1] and self.stride == (1, 1) and self.dilation == (1, 1)
                and all(2 * p == k[0] - 1 for p in self.padding) and not any(p.w4 for p in self.parts)
                and all(x.dtype == torch.float8_e4m3fn for x in pieces))

    def fuses_shortcut(self, xq: torch.Tensor, shortcut: nn.Module, pieces: Sequence[torch.Tensor]) -> bool:
        """Whether :meth:`forward_shortcut` runs ``self(xq) + shortcut(cat(pieces))`` as one ``diffquant::qconv_sc``:
        this layer a single-part FP8 conv with a static input scale that keeps the size (stride 1, dilation 1,
        padding (k - 1) / 2), fed its quantized input; ``shortcut`` a 1x1 FP8 conv with static input scales, of one
        or two parts, and ``pieces`` its quantized parts; FP8 weights throughout."""
        if not (self.kind == "conv" and self.act == "fp8" and len(self.parts) == 1 and not self.parts[0].w4
                and xq.dtype == torch.float8_e4m3fn and self.stride == (1, 1) and self.dilation == (1, 1)
                and all(2 * p == k - 1 for p, k in zip(self.padding, self.kernel_size))):
            return False
        if not (isinstance(shortcut, LowBitLayer) and shortcut.kind == "conv" and shortcut.act == "fp8"
                and shortcut._is_gemm() and shortcut.out_channels == self.out_channels
                and 1 <= len(shortcut.parts) <= 2 and len(pieces) == len(shortcut.parts)):
            return False
        return all(not p.w4 and x.dtype == torch.float8_e4m3fn and x.dim() == 4 and x.shape[1] == p.hi - p.lo
                   and x.shape[0] == xq.shape[0] and x.shape[2:] == xq.shape[2:]
                   for p, x in zip(shortcut.parts, pieces))

    def forward_shortcut(self, xq: torch.Tensor, shortcut: "LowBitLayer", pieces: Sequence[torch.Tensor],
                         out_dtype: torch.dtype) -> torch.Tensor:
        """``self(xq) + shortcut(cat(pieces))`` (a ResNet block's conv2 and its shortcut; ``xq`` and ``pieces``
        quantized) as one ``diffquant::qconv_sc``: one accumulator, one rounding. Where :meth:`fuses_shortcut`
        refuses, the shortcut's output is conv2's residual, as in the unfused block."""
        pieces = list(pieces)
        if not self.fuses_shortcut(xq, shortcut, pieces):
            y = (shortcut(pieces[0], out_dtype=out_dtype) if len(pieces) == 1
                 else shortcut._qconv_parts(pieces, None, out_dtype, None))
            return self(xq, out_dtype=out_dtype, residual=y)
        p = self.parts[0]
        sp = list(shortcut.parts)
        return ops.qconv_sc(xq, p.w, p.w_scale, p.a_scale, self.bias, pieces, [q.w for q in sp],
                            [q.w_scale for q in sp], [q.a_scale for q in sp], shortcut.bias, list(self.padding),
                            out_dtype)

    def gives_row_stats(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward_stats` runs on ``x``: a conv with a static input quantization that runs
        ``diffquant::qconv`` (not a tensor-wise GEMM), fed its quantized input (a fused norm's output)."""
        return (self.kind == "conv" and self.act in ("fp8", "int") and self.fp8_gemm not in ("scaled_mm", "scaled_mm_tw")
                and x.dtype == (torch.float8_e4m3fn if self.act == "fp8" else torch.int8))

    def forward_stats(self, xq: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """:meth:`forward` on the quantized input ``xq`` and the output's per-row statistics for a following group
        norm: ``(y, mean, m2)``, the last part's conv as ``diffquant::qconv_stats`` (a split layer's last part adds
        the earlier parts' sum in its epilogue, so its stored output is the layer's). See :meth:`gives_row_stats`."""
        if not self.gives_row_stats(xq):
            raise ValueError(f"{self.layer_name}: forward_stats needs a conv with static input quantization fed its "
                             f"quantized input; got {self.kind}, act {self.act}, gemm {self.fp8_gemm}, input "
                             f"{xq.dtype}")
        if not xq.is_contiguous(memory_format=torch.channels_last):
            xq = xq.contiguous(memory_format=torch.channels_last)
        y = None
        for i, p in enumerate(self.parts):
            args = (xq if len(self.parts) == 1 else xq[:, p.lo:p.hi], p.w, p.w_scale, p.a_scale, p.corr, p.wzp,
                    self.bias if i == 0 else None, y, p.a_zp, list(self.stride), list(self.padding),
                    list(self.dilation), p.w4, out_dtype, p.pad_corr)
            if i == len(self.parts) - 1:
                return ops.qconv_stats(*args)
            y = ops.qconv(*args)

    def takes_pieces(self, pieces) -> bool:
        """Whether :meth:`forward_pieces` runs this layer on ``pieces`` without concatenating them: a split conv whose
        parts are the pieces' channels, with static (or no) input quantization."""
        return (self.kind == "conv" and len(pieces) == len(self.parts) > 1 and self.act in ("fp8", "int", "none")
                and all(x.dim() == 4 and x.shape[1] == p.hi - p.lo for x, p in zip(pieces, self.parts)))

    def forward_pieces(self, pieces, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer on ``torch.cat(pieces, 1)`` without the concatenation (a UNet up block's shortcut conv on
        ``[h, skip]``): each part quantizes and convolves its own piece. Same numbers as :meth:`forward` on the
        concatenation; a layer that :meth:`takes_pieces` refuses gets the concatenation."""
        pieces = list(pieces)
        if not self.takes_pieces(pieces):
            return self.forward(torch.cat(pieces, 1), residual=residual)
        out_dtype = pieces[0].dtype
        quantized = []
        for p, x in zip(self.parts, pieces):
            if self.act == "fp8":
                x = quantize_act_fp8(x, self.act_scale[:, p.lo:p.hi])
            elif self.act == "int":
                x = quantize_act_int8(x, self.act_inv_scale[:, p.lo:p.hi], self.act_zp[:, p.lo:p.hi], self.qmin,
                                      self.qmax, self.offset)
            quantized.append(x if x.is_contiguous(memory_format=torch.channels_last)
                             else x.contiguous(memory_format=torch.channels_last))
        return self._qconv_parts(quantized, None, out_dtype, residual)

    def _scaled_mm(self, xq: torch.Tensor, dyn_scale: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        p = self.parts[0]
        nb, c, h, w = xq.shape
        a2 = _row_major(xq.permute(0, 2, 3, 1).reshape(-1, c))
        m = a2.shape[0]
        if self.act == "fp8_token":
            s_a = dyn_scale.reshape(m, 1)
        else:
            s_a = (dyn_scale if dyn_scale is not None else p.a_scale).reshape(1, 1).expand(m, 1).contiguous()
        # p.w is [Cout, 1, 1, Cin] contiguous: as [Cout, Cin] row-major, its .t() is the column-major
        # second operand cuBLASLt wants (no copy)
        w2 = p.w.view(self.out_channels, c)
        if self.fp8_gemm == "scaled_mm_tw" and self.act != "fp8_token":
            # one scale per operand (cuBLAS's tensor-wise FP8 kernels); the weight's per-channel scales and the bias
            # applied to the bf16 result in fp32 (under torch.compile, fused into the output's next elementwise kernel)
            y = self._scaled_mm_tw_raw(a2, dyn_scale)
            y = y.float() * p.w_scale.view(1, -1)
            if self.bias is not None:
                y = y + self.bias
            return y.to(out_dtype).reshape(nb, h, w, self.out_channels).permute(0, 3, 1, 2)
        fuse_bias = self.bias is not None and out_dtype == torch.bfloat16
        y = torch._scaled_mm(a2, w2.t(), scale_a=s_a, scale_b=p.w_scale.view(1, -1),
                             bias=self.bias.to(torch.bfloat16) if fuse_bias else None, out_dtype=torch.bfloat16)
        y = y.to(out_dtype)
        if self.bias is not None and not fuse_bias:
            y = y + self.bias.to(out_dtype)
        return y.reshape(nb, h, w, self.out_channels).permute(0, 3, 1, 2)

    def _scaled_mm_tw_raw(self, a2: torch.Tensor, dyn_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """The tensor-wise FP8 GEMM's bf16 output, [M, N], before the weight's per-channel scales and the bias."""
        p = self.parts[0]
        s_t = (dyn_scale if dyn_scale is not None else p.a_scale).reshape(()).float()
        # scaled_mm_tw is set only by set_fp8_gemm, which registers the unit scale _tw_one
        return torch._scaled_mm(a2, p.w.view(self.out_channels, a2.shape[1]).t(), scale_a=s_t, scale_b=self._tw_one,
                                out_dtype=torch.bfloat16)

    def raw_output_ok(self, out_dtype: torch.dtype) -> bool:
        """Whether :meth:`forward_raw` leaves the dequantization to the consumer: a one-part Linear or 1x1 conv on
        cuBLAS's tensor-wise FP8 GEMM (``set_fp8_gemm``) with a bf16 output."""
        return (len(self.parts) == 1 and self.fp8_gemm == "scaled_mm_tw" and self.act in ("fp8", "fp8_dynamic")
                and out_dtype == torch.bfloat16 and (self.kind == "linear" or self._is_gemm()))

    def forward_raw(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> tuple:
        """``(y, y_scale, y_bias)`` with ``y * y_scale + y_bias`` (per output channel, rounded to ``y``'s dtype) equal
        to ``self(x, out_dtype)``: where :meth:`raw_output_ok`, the GEMM's raw output (shaped as ``self`` returns
        it) and the dequantization left to the consumer (``diffquant::add_layer_norm`` applies it in its own pass);
        for any other layer ``(self(x, out_dtype), None, None)``."""
        prequantized = x.dtype == torch.float8_e4m3fn and self.act == "fp8"
        if prequantized and out_dtype is None:
            raise ValueError(f"{self.layer_name}: a quantized input needs the output dtype (out_dtype=...)")
        if not self.raw_output_ok(out_dtype or x.dtype):
            return self(x, out_dtype=out_dtype), None, None
        if self.kind == "linear":
            x4 = x.reshape(-1, x.shape[-1])[:, :, None, None]
        else:
            x4 = x
        xq, dyn_scale = (x4, None) if prequantized else self._quantize_input(x4)
        nb, c, h, w = xq.shape
        y = self._scaled_mm_tw_raw(_row_major(xq.permute(0, 2, 3, 1).reshape(-1, c)), dyn_scale)
        if self.kind == "linear":
            y = y.reshape(*x.shape[:-1], self.out_channels)
        else:
            y = y.reshape(nb, h, w, self.out_channels).permute(0, 3, 1, 2)
        return y, self.parts[0].w_scale, self.bias


def set_fp8_gemm(model: nn.Module, mode: str, exclude: Sequence[str] = ()) -> int:
    """Switch the converted model's cuBLAS FP8 GEMMs between row-wise scales (``"rowwise"``, what convert picks) and
    tensor-wise scales (``"tensorwise"``: the weight's per-channel scales and the bias applied, in fp32, to the bf16
    GEMM output; to time whether cuBLAS's tensor-wise kernels are faster). Per-token dynamic layers stay row-wise,
    and so do layers whose name ends with one of ``exclude`` (e.g. ``("to_qkv", "to_kv", "to_q")``: attention reads
    their output directly, so a tensor-wise GEMM there costs a separate pass for the per-channel scales; in the
    SD-1.5 b8 profile those passes took about 0.25 ms; with the Q/K/V projections excluded the model ran 15.55 ms
    against 15.85 with none excluded, same call; H200, 2026-11-28, BENCHMARKS.md "Kernels, ninth measurement").
    Returns the number of layers switched."""
    if mode not in ("rowwise", "tensorwise"):
        raise ValueError(f"mode={mode!r}; allowed: 'rowwise', 'tensorwise'")
    if isinstance(exclude, str):
        raise TypeError("exclude: a sequence of layer-name endings, not one string")
    n = 0
    for m in model.modules():
        if isinstance(m, LowBitLayer) and m.fp8_gemm in ("scaled_mm", "scaled_mm_tw") and m.act != "fp8_token":
            tw = mode == "tensorwise" and not any(m.layer_name.endswith(e) for e in exclude)
            m.fp8_gemm = "scaled_mm_tw" if tw else "scaled_mm"
            if tw and "_tw_one" not in m._buffers:
                # the weight operand's scale (1: the per-channel scales follow the GEMM), made once, not per call
                m.register_buffer("_tw_one", torch.ones((), device=m.parts[0].w.device), persistent=False)
            n += tw or mode == "rowwise"
    return n


def _row_major(a: torch.Tensor) -> torch.Tensor:
    """``a`` (2-D) with strides ``(K, 1)``, as cuBLASLt's row-major first operand. A contiguous
    tensor can still carry odd strides on a size-1 dimension (a 1-row view has stride (1, 1), which
    cuBLASLt reads as column-major): those are restrided in place, anything else is copied."""
    k = a.shape[1]
    if a.stride() == (k, 1):
        return a
    if a.is_contiguous():
        return a.as_strided(a.shape, (k, 1))
    return a.contiguous()


def scaled_mm_works(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise scales runs here (checked once on tiny tensors)."""
    key = str(device)
    if key not in _SCALED_MM_OK:
        ok = False
        if device.type == "cuda" and hasattr(torch, "_scaled_mm"):
            try:
                a = torch.randn(32, 32, device=device).to(torch.float8_e4m3fn)
                b = torch.randn(32, 32, device=device).to(torch.float8_e4m3fn)
                sa = torch.ones(32, 1, device=device)
                sb = torch.ones(1, 32, device=device)
                y = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
                ref = a.float() @ b.float().t()
                ok = bool(torch.allclose(y.float(), ref, rtol=2e-2, atol=1e-1))
            except Exception:  # not supported on this GPU / build
                ok = False
        _SCALED_MM_OK[key] = ok
    return _SCALED_MM_OK[key]


_SCALED_MM_OK: dict = {}
