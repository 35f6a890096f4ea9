"""Block-level fusion for inference: diffusers blocks whose group norms run as ``diffquant::group_norm_act``.

In a ResNet block each group norm is followed by SiLU and a 3x3 conv; in a ``Transformer2DModel`` the input norm is
followed by ``proj_in``. :func:`fuse_group_norms` swaps the class of every such block that has the plain form for a
subclass (``FusedNormResnetBlock2D``, ``FusedNormTransformer2DModel``) that computes norm (+ SiLU, + the time
embedding added before ``norm2``) in one op over channels-last activations. When the conv is a converted
layer with a static input quantization (FP8, or integer with a zero point), the op also writes the conv's
quantized input. The up blocks (UpBlock2D, AttnUpBlock2D, CrossAttnUpBlock2D) get a subclass that hands each ResNet
step ``(h, skip)`` instead of ``torch.cat([h, skip], 1)``: the norm reads both, and a split shortcut conv takes its
two pieces. A UNet's output norm runs with its SiLU as one op (``FusedGroupNormSiLU``; ``conv_act`` becomes an
identity). The parameters and the state dict are unchanged; a block in training mode, or called with extra
arguments, runs diffusers' own forward.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from diffquant.kernels.modules import LowBitLayer
from diffquant.kernels.ops import group_norm_act, group_norm_act_dual, group_norm_act_stats


def _unfusable(block) -> Optional[str]:
    """Why ``block`` keeps diffusers' forward (None: it can be fused)."""
    if block.time_embedding_norm != "default":
        return f"time_embedding_norm={block.time_embedding_norm!r}"
    if block.upsample is not None or block.downsample is not None:
        return "up/down-sampling inside the block"
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if type(norm) is not nn.GroupNorm or not norm.affine:
            return f"{name} is {type(norm).__name__} (needs an affine nn.GroupNorm)"
    if type(block.nonlinearity) is not nn.SiLU:
        return f"nonlinearity is {type(block.nonlinearity).__name__} (needs SiLU)"
    # any conv takes the float output (a converted or fake-quant conv quantizes it itself); a converted conv with a
    # static input quantization gets its quantized input straight from the norm (_input_quantization)
    return None


def _resnet_block_class():
    from diffusers.models.resnet import ResnetBlock2D

    return ResnetBlock2D


def _input_quantization(conv: nn.Module, dtype: torch.dtype) -> tuple:
    """What the norm writes for ``conv``: ``(out_dtype, scale, zero point, qmin, qmax, offset)``: e4m3 for a converted
    conv with static FP8 input scales, its int8 codes for one with a static integer input quantization, else the
    float activations (a converted conv with dynamic scales, or a float / fake-quant conv, quantizes them itself)."""
    if isinstance(conv, LowBitLayer) and conv.act == "fp8":  # one scale per input channel (a split layer: 2 values)
        return torch.float8_e4m3fn, conv.act_scale.reshape(-1), None, 0, 0, 0
    if isinstance(conv, LowBitLayer) and conv.act == "int":
        return (torch.int8, conv.act_inv_scale.reshape(-1), conv.act_zp.reshape(-1), conv.qmin, conv.qmax,
                conv.offset)
    return dtype, None, None, 0, 0, 0


def _dual_out_args(consumer: nn.Module, dtype: torch.dtype) -> tuple:
    """``diffquant::group_norm_act_dual``'s first-output arguments for ``consumer``: (scale, dtype, zp, qmin, qmax,
    offset) in the op's order."""
    out_dtype, scale, zp, qmin, qmax, offset = _input_quantization(consumer, dtype)
    return scale, out_dtype, zp, qmin, qmax, offset


def conv_row_stats_enabled() -> bool:
    """``DIFFQUANT_GN_CONV_STATS=1``: a fused ResNet block's conv1 hands norm2 its output's per-row statistics
    (``diffquant::qconv_stats`` → ``diffquant::group_norm_act_stats``), so norm2 skips its statistics pass over
    conv1's output. Off by default: on the CIFAR DDPM at batch 256 it removed 0.29 ms of statistics passes and added
    0.73 ms to the conv1s' epilogues (8.41 against 7.86 ms; H200, 2026-11-29, BENCHMARKS.md "eleventh
    measurement", call 4)."""
    v = os.environ.get("DIFFQUANT_GN_CONV_STATS", "0")
    if v not in ("0", "1"):
        raise ValueError(f"DIFFQUANT_GN_CONV_STATS={v!r}: 0 or 1")
    return v == "1"


def shortcut_fusion_enabled() -> bool:
    """``DIFFQUANT_SC_FUSE`` (``1``, the default; ``0`` turns it off): a fused ResNet block whose conv2 and 1x1
    shortcut are FP8 convs with static input scales runs both as one ``diffquant::qconv_sc`` (conv2's taps, then the
    shortcut's one or two sources, in one accumulator; :meth:`.LowBitLayer.forward_shortcut`) instead of the
    shortcut's kernels and conv2 adding their output. The op itself sends the calls whose kernel grid would not fill
    the GPU back to the separate qconv calls (:func:`.triton_conv.sc_composed_reason`). With
    ``DIFFQUANT_SPLIT_FUSE``, both on: SD-1.5 at batch 8 ran 13.85 ms against 14.46 without, the CIFAR DDPM at batch
    256 7.25 against 7.93 (H200, 2026-11-29, BENCHMARKS.md "Kernels, fourteenth measurement")."""
    v = os.environ.get("DIFFQUANT_SC_FUSE", "1")
    if v not in ("0", "1"):
        raise ValueError(f"DIFFQUANT_SC_FUSE={v!r}: 0 or 1")
    return v == "1"


def _fp8_static(layer: nn.Module) -> bool:
    return isinstance(layer, LowBitLayer) and layer.act == "fp8"

def _norm_into(norm: nn.GroupNorm, consumer: nn.Module, x: torch.Tensor, add_nc: Optional[torch.Tensor], silu: bool,
               as_tokens: bool = False, residual: Optional[torch.Tensor] = None,
               x2: Optional[torch.Tensor] = None, rows: Optional[tuple] = None,
               shortcut: Optional[tuple] = None, raw: bool = False):
    """``consumer(act(norm(cat(x, x2) + add_nc))) + residual`` with the norm, the activation and the consumer's input
    quantization in one op (and the residual in a converted consumer's epilogue); ``as_tokens``: the consumer is a
    Linear over [N, H*W, C] (a free view of the channels-last output); ``rows``: x's per-row statistics
    ``(mean, m2)`` from its producing conv (``diffquant::group_norm_act_stats``, no second tensor then);
    ``shortcut``: ``(layer, quantized pieces)`` whose output is the residual, computed with the converted consumer
    (:meth:`.LowBitLayer.forward_shortcut`); ``raw``: the converted consumer's ``(raw output, scale, bias)``
    (:meth:`.LowBitLayer.forward_raw`) instead of its output."""
    out_dtype, scale, zp, qmin, qmax, offset = _input_quantization(consumer, x.dtype)
    if rows is not None:
        h = group_norm_act_stats(x, rows[0], rows[1], add_nc, norm.weight, norm.bias, norm.num_groups,
                                 float(norm.eps), silu, scale, out_dtype, zp, qmin, qmax, offset)
    else:
        h = group_norm_act(x, x2, add_nc, norm.weight, norm.bias, norm.num_groups, float(norm.eps), silu, scale,
                           out_dtype, zp, qmin, qmax, offset)
    if as_tokens:
        h = h.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2] * x.shape[3], h.shape[1])
    if shortcut is not None:
        return consumer.forward_shortcut(h, shortcut[0], shortcut[1], x.dtype)
    if raw:
        return consumer.forward_raw(h, x.dtype)
    return _consume(consumer, h, x.dtype, residual)


def _consume(consumer: nn.Module, h: torch.Tensor, dtype: torch.dtype,
             residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``consumer(h) + residual``: a converted consumer takes ``h`` as it comes (quantized or float, output in
    ``dtype``) and adds the residual in its epilogue."""
    if isinstance(consumer, LowBitLayer):
        return consumer(h, out_dtype=dtype, residual=residual)
    y = consumer(h)
    return y if residual is None else y + residual


class _FusedNormMixin:
    def _norm_act(self, norm: nn.GroupNorm, conv: nn.Module, x: torch.Tensor, add_nc: Optional[torch.Tensor],
                  residual: Optional[torch.Tensor] = None, rows: Optional[tuple] = None,
                  shortcut: Optional[tuple] = None):
        return _norm_into(norm, conv, x, add_nc, True, residual=residual, rows=rows, shortcut=shortcut)

    def _fuse_shortcut(self) -> bool:
        """Whether conv2 computes the shortcut too (:func:`shortcut_fusion_enabled`, both FP8 with static input
        scales, ``output_scale_factor`` 1)."""
        return (shortcut_fusion_enabled() and self.output_scale_factor == 1 and _fp8_static(self.conv2)
                and _fp8_static(self.conv_shortcut) and self.conv_shortcut._is_gemm())

    @staticmethod
    def _pieces(sc: LowBitLayer, xq: torch.Tensor) -> list:
        return [xq] if len(sc.parts) == 1 else [xq[:, p.lo:p.hi] for p in sc.parts]

    def forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor], *args,
                skip: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """diffusers' forward; ``skip``: the input is ``torch.cat([input_tensor, skip], 1)`` (a fused up block's
        call), which :meth:`_forward_pair` need not materialize."""
        if skip is not None and not (self.training or args or kwargs):
            return self._forward_pair(input_tensor, skip, temb)
        if skip is not None:
            input_tensor = torch.cat([input_tensor, skip], 1)
        if self.training or args or kwargs:
            return super().forward(input_tensor, temb, *args, **kwargs)
        h, rows = self._conv1(input_tensor)
        t = self._time_proj(temb)
        if self._fuse_shortcut():
            sc = self.conv_shortcut
            pieces = self._pieces(sc, sc._quantize_input(input_tensor)[0])
            return self._norm_act(self.norm2, self.conv2, h, t, rows=rows, shortcut=(sc, pieces))
        x = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        if self.output_scale_factor == 1:  # the shortcut added in conv2's epilogue (dropout: identity in eval)
            return self._norm_act(self.norm2, self.conv2, h, t, residual=x, rows=rows)
        return (x + self._norm_act(self.norm2, self.conv2, h, t, rows=rows)) / self.output_scale_factor

    def _conv1(self, x: torch.Tensor, x2: Optional[torch.Tensor] = None,
               quantized: Optional[torch.Tensor] = None) -> tuple:
        """conv1(SiLU(norm1(cat(x, x2)))) (``quantized``: norm1's output, already computed) and, where
        :func:`conv_row_stats_enabled` and conv1 can (:meth:`LowBitLayer.gives_row_stats`), its output's per-row
        statistics for norm2; else None for them."""
        if quantized is None:
            out_dtype, scale, zp, qmin, qmax, offset = _input_quantization(self.conv1, x.dtype)
            n1 = self.norm1
            quantized = group_norm_act(x, x2, None, n1.weight, n1.bias, n1.num_groups, float(n1.eps), True, scale,
                                       out_dtype, zp, qmin, qmax, offset)
        if (conv_row_stats_enabled() and isinstance(self.conv1, LowBitLayer)
                and self.conv1.gives_row_stats(quantized)):
            h, mean, m2 = self.conv1.forward_stats(quantized, x.dtype)
            return h, (mean, m2)
        return _consume(self.conv1, quantized, x.dtype), None

    def _forward_pair(self, h_in: torch.Tensor, skip: torch.Tensor, temb: Optional[torch.Tensor]) -> torch.Tensor:
        """``forward(torch.cat([h_in, skip], 1), temb)`` without the concatenation where the shortcut is a split
        converted conv (a UNet up block's first step): norm1 reads both tensors in place and each shortcut part
        takes its own piece. Otherwise the concatenation, then :meth:`forward`."""
        sc = self.conv_shortcut
        if not (isinstance(sc, LowBitLayer) and sc.takes_pieces([h_in, skip]) and self.output_scale_factor == 1):
            return self.forward(torch.cat([h_in, skip], 1), temb)
        if sc.act in ("fp8", "int"):  # one read of (h, skip): conv1's input and the shortcut's quantized input
            n1 = self.norm1
            raw_dtype, raw_scale, raw_zp, rqmin, rqmax, rqoffset = _input_quantization(sc, h_in.dtype)
            hq, raw = group_norm_act_dual(h_in, skip, n1.weight, n1.bias, n1.num_groups, float(n1.eps), True,
                                          *_dual_out_args(self.conv1, h_in.dtype), raw_scale, raw_dtype, raw_zp,
                                          rqmin, rqmax, rqoffset)
            h, rows = self._conv1(h_in, quantized=hq)
            if self._fuse_shortcut():
                return self._norm_act(self.norm2, self.conv2, h, self._time_proj(temb), rows=rows,
                                      shortcut=(sc, self._pieces(sc, raw)))
            x = sc(raw, out_dtype=h_in.dtype)
        else:
            h, rows = self._conv1(h_in, skip)
            x = sc.forward_pieces([h_in, skip])
        return self._norm_act(self.norm2, self.conv2, h, self._time_proj(temb), residual=x, rows=rows)

    def _time_proj(self, temb: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The time embedding's per-channel addend before norm2: this block's columns of the model's stacked
        projection (:func:`stack_time_projections`: ``temb`` is that projection) or its own projection."""
        if self.time_emb_proj is None or temb is None:
            return None
        if isinstance(self.time_emb_proj, _TembSlice):
            return temb[:, self.time_emb_proj.lo:self.time_emb_proj.hi]
        return self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))


class _FusedUpMixin:
    """An up block whose ResNet steps get ``(hidden_states, skip)`` instead of their concatenation
    (``resnet(h, temb, skip=skip)``: :meth:`_FusedNormMixin._forward_pair`). Training, gradient checkpointing with
    grad enabled, FreeU, or a ResNet that is not fused: diffusers' own forward."""

    def _fused_path(self) -> bool:
        freeu = all(getattr(self, k, None) for k in ("s1", "s2", "b1", "b2"))
        return not (self.training or freeu or (torch.is_grad_enabled() and self.gradient_checkpointing)
                    or not all(isinstance(r, _FusedNormMixin) for r in self.resnets))

    def _steps(self, hidden_states, res_hidden_states_tuple, temb, attend=None):
        attentions = getattr(self, "attentions", None) or [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            skip, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
            hidden_states = resnet(hidden_states, temb, skip=skip)
            if attn is not None:
                hidden_states = attend(attn, hidden_states)
        return hidden_states


class _FusedUpBlockMixin(_FusedUpMixin):
    """UpBlock2D and AttnUpBlock2D (self-attention without a context; a "resnet" upsampler takes the time
    embedding)."""

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None, *args, **kwargs):
        if args or kwargs or not self._fused_path():
            return super().forward(hidden_states, res_hidden_states_tuple, temb, upsample_size, *args, **kwargs)
        hidden_states = self._steps(hidden_states, res_hidden_states_tuple, temb, lambda attn, h: attn(h))
        for upsampler in self.upsamplers or []:
            if getattr(self, "upsample_type", None) == "resnet":
                hidden_states = upsampler(hidden_states, temb=temb)
            elif hasattr(self, "upsample_type"):  # AttnUpBlock2D's other upsamplers take no size
                hidden_states = upsampler(hidden_states)
            else:
                hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


class _FusedCrossAttnUpBlockMixin(_FusedUpMixin):
    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                cross_attention_kwargs=None, upsample_size=None, attention_mask=None, encoder_attention_mask=None):
        if not self._fused_path():
            return super().forward(hidden_states, res_hidden_states_tuple, temb, encoder_hidden_states,
                                   cross_attention_kwargs, upsample_size, attention_mask, encoder_attention_mask)

        def attend(attn, h):
            return attn(h, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                        attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask,
                        return_dict=False)[0]

        hidden_states = self._steps(hidden_states, res_hidden_states_tuple, temb, attend)
        for upsampler in self.upsamplers or []:
            hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


class _FusedInputNormMixin:
    def _operate_on_continuous_inputs(self, hidden_states: torch.Tensor):
        if self.training:
            return super()._operate_on_continuous_inputs(hidden_states)
        # fuse_ln: the first transformer block reads proj_in's raw tensor-wise GEMM output and dequantizes it in its
        # first norm's pass (FusedLNBasicTransformerBlock.input_dequant decides the same way)
        raw = bool(getattr(self, "_raw_into_block", False) and isinstance(self.proj_in, LowBitLayer)
                   and self.proj_in.raw_output_ok(hidden_states.dtype))
        h = _norm_into(self.norm, self.proj_in, hidden_states, None, False, as_tokens=self.use_linear_projection,
                       raw=raw)
        if raw:
            h = h[0]
        if self.use_linear_projection:  # what diffusers returns as inner_dim: the channels before proj_in
            return h, hidden_states.shape[1]
        return h.permute(0, 2, 3, 1).reshape(hidden_states.shape[0], -1, h.shape[1]), h.shape[1]


def _transformer_class():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return Transformer2DModel


def _transformer_unfusable(block) -> Optional[str]:
    if not block.is_input_continuous:
        return "input is not continuous (vectorized / patches)"
    if type(block.norm) is not nn.GroupNorm or not block.norm.affine:
        return f"norm is {type(block.norm).__name__} (needs an affine nn.GroupNorm)"
    return None


class FusedGroupNormSiLU(nn.GroupNorm):
    """A UNet's output norm (``conv_norm_out``) that also applies the SiLU after it (its ``conv_act`` becomes an
    ``nn.Identity``): one ``diffquant::group_norm_act`` in eval mode, the plain ops in training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or x.dim() != 4:
            return torch.nn.functional.silu(super().forward(x))
        return group_norm_act(x, None, None, self.weight, self.bias, self.num_groups, float(self.eps), True, None,
                              x.dtype)


def _fuse_output_norm(model: nn.Module) -> Optional[str]:
    """``model.conv_norm_out`` + ``model.conv_act`` (UNet2DModel, UNet2DConditionModel) as one op, in place: None if
    done, else why not."""
    norm, act = getattr(model, "conv_norm_out", None), getattr(model, "conv_act", None)
    if norm is None:
        return "no conv_norm_out"
    if type(norm) is not nn.GroupNorm or not norm.affine or type(act) is not nn.SiLU:
        return f"conv_norm_out is {type(norm).__name__}, conv_act {type(act).__name__} (needs affine GroupNorm + SiLU)"
    norm.__class__ = FusedGroupNormSiLU
    model.conv_act = nn.Identity()
    return None


def _up_block_classes() -> dict:
    from diffusers.models.unets.unet_2d_blocks import AttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D

    return {"up": (UpBlock2D, _FusedUpBlockMixin), "attn_up": (AttnUpBlock2D, _FusedUpBlockMixin),
            "cross_attn_up": (CrossAttnUpBlock2D, _FusedCrossAttnUpBlockMixin)}


_FUSED_CLASSES: dict = {}


def fused_class(kind: str = "resnet"):
    """The fused subclass of ``ResnetBlock2D`` (``kind="resnet"``), ``Transformer2DModel`` (``"transformer"``) or an
    up block (``"up"``, ``"attn_up"``, ``"cross_attn_up"``: UpBlock2D, AttnUpBlock2D, CrossAttnUpBlock2D), made on
    first use (diffusers is imported lazily)."""
    if kind not in _FUSED_CLASSES:
        ups = _up_block_classes()
        if kind in ups:
            base, mixin = ups[kind]
            _FUSED_CLASSES[kind] = type("Fused" + base.__name__, (mixin, base), {
                "__doc__": f"A {base.__name__} whose ResNet steps take (hidden_states, skip) without concatenating "
                           f"them, where the ResNet block and its shortcut conv allow it."})
        elif kind == "resnet":
            _FUSED_CLASSES[kind] = type("FusedNormResnetBlock2D", (_FusedNormMixin, _resnet_block_class()), {
                "__doc__": "A ResnetBlock2D whose norm + SiLU (+ time embedding) run as diffquant::group_norm_act."})
        elif kind == "transformer":
            _FUSED_CLASSES[kind] = type("FusedNormTransformer2DModel", (_FusedInputNormMixin, _transformer_class()), {
                "__doc__": "A Transformer2DModel whose input norm runs as diffquant::group_norm_act."})
        else:
            raise ValueError(f"kind={kind!r}; allowed: 'resnet', 'transformer', 'up', 'attn_up', 'cross_attn_up'")
    return _FUSED_CLASSES[kind]


def fuse_group_norms(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Swap every plain ``ResnetBlock2D`` and ``Transformer2DModel`` of ``model`` for its fused-norm subclass, in
    place: ``(fused block names, {block name: why it was left alone})``."""
    kinds = [(_resnet_block_class(), fused_class("resnet"), _unfusable),
             (_transformer_class(), fused_class("transformer"), _transformer_unfusable)]
    fused, left = [], {}
    # DIFFQUANT_FUSE_UP=0: the session-8 additions (up blocks without the concatenation, the output norm) left out,
    # for an A/B of their worth on the GPU
    if os.environ.get("DIFFQUANT_FUSE_UP", "1") != "0":
        kinds += [(base, fused_class(kind), lambda m: None) for kind, (base, _) in _up_block_classes().items()]
        why = _fuse_output_norm(model)
        if why is None:
            fused.append("conv_norm_out")
        elif why != "no conv_norm_out":
            left["conv_norm_out"] = why
    swap_classes(model, kinds, fused, left)
    return fused, left


def swap_classes(model: nn.Module, kinds: list, fused: list, left: dict) -> None:
    """For each ``(base, cls, unfusable)`` of ``kinds``: every module of ``model`` whose type is ``base`` becomes a
    ``cls`` in place (its name appended to ``fused``), unless ``unfusable(module)`` says why not (``left[name]``)."""
    for name, m in model.named_modules():
        for base, cls, unfusable in kinds:
            if type(m) is base:
                why = unfusable(m)
                if why is None:
                    m.__class__ = cls
                    fused.append(name)
                else:
                    left[name] = why


class _TembSlice(nn.Module):
    """A ResNet block's ``time_emb_proj`` once the model's time projections are stacked
    (:func:`stack_time_projections`): the block reads columns [lo, hi) of the stacked projection, which the UNet's
    time embedding returns in place of the embedding. Called directly (diffusers' own forward: training mode), it
    refuses."""

    def __init__(self, lo: int, hi: int):
        super().__init__()
        self.lo, self.hi = lo, hi

    def extra_repr(self) -> str:
        return f"columns {self.lo}:{self.hi} of the stacked time projection"

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this ResNet block's time projection is part of the model's stacked one "
                           "(convert(..., fuse_temb=True)): the converted model runs in eval mode only")


class StackedTimeEmbedding(nn.Module):
    """A UNet's ``time_embedding`` followed by the ResNet blocks' nonlinearity and all their time projections as one
    stacked low-bit GEMM (:func:`stack_time_projections`): it returns [batch, sum of the blocks' channels], which the
    UNet hands every block as ``temb``."""

    def __init__(self, time_embedding: nn.Module, act: nn.Module, proj: LowBitLayer):
        super().__init__()
        self.time_embedding, self.act, self.proj = time_embedding, act, proj
        self.train(time_embedding.training)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.training:
            raise RuntimeError("the stacked time projection (convert(..., fuse_temb=True)) runs in eval mode only")
        return self.proj(self.act(self.time_embedding(*args, **kwargs)))


def stack_time_projections(model: nn.Module) -> tuple[int, Optional[str]]:
    """Stack the time projections of every ResNet block of the UNet ``model`` into one low-bit GEMM run once per call
    after the time embedding (diffusers computes ``time_emb_proj(silu(temb))`` in each block: 22 small GEMMs and their
    input quantizations in the SD-1.5 and CIFAR UNets), in place: ``(blocks stacked, None)`` or ``(0, why not)``.
    Needs every block with a time projection to be a fused ResNet block (:func:`fuse_group_norms`) whose projection
    is a converted Linear with the same input quantization, and nothing but the blocks reading the embedding."""
    from diffquant.kernels.fused_attention import _unmergeable, stack_linears

    if not hasattr(model, "time_embedding") or isinstance(model.time_embedding, StackedTimeEmbedding):
        return 0, "no time_embedding, or already stacked"
    for attr in ("class_embedding", "add_embedding", "time_embed_act"):
        if getattr(model, attr, None) is not None:
            return 0, f"the model has a {attr}, which changes the embedding after time_embedding"
    blocks = [m for m in model.modules() if isinstance(m, _resnet_block_class()) and m.time_emb_proj is not None]
    if not blocks:
        return 0, "no ResNet block with a time projection"
    for m in blocks:
        if not isinstance(m, _FusedNormMixin):
            return 0, "a ResNet block keeps diffusers' forward (fuse_norms=True fuses the plain ones)"
        if m.skip_time_act or type(m.nonlinearity) is not nn.SiLU:
            return 0, "a ResNet block skips the SiLU before its time projection"
    layers = [m.time_emb_proj for m in blocks]
    why = _unmergeable(layers)
    if why is not None:
        return 0, why
    stacked = stack_linears(layers, "time_emb_proj_stacked")
    lo = 0
    for m in blocks:
        m.time_emb_proj = _TembSlice(lo, lo + m.time_emb_proj.out_channels)
        lo = m.time_emb_proj.hi
    model.time_embedding = StackedTimeEmbedding(model.time_embedding, blocks[0].nonlinearity, stacked)
    return len(blocks), None
