"""Attention layers whose projections are modules, so that they can be factorized.

``nn.MultiheadAttention`` keeps its input projection as bare parameters
(``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``) and reads
``out_proj.weight`` directly; torchvision's Swin window attention reads ``qkv.weight``
and ``proj.weight``. A factorized module put in their place would never be called.
:func:`modularize_attention` rewrites such parents, exactly, into modules whose forward
calls each projection as a module:

- ``nn.MultiheadAttention`` becomes :class:`ModularMultiheadAttention`, with children
  ``in_proj`` (packed form) or ``q_proj``/``k_proj``/``v_proj`` (separate form) and
  ``out_proj``. Its forward has MultiheadAttention's signature and math (written out
  because ``F.multi_head_attention_forward`` takes weights, not modules). While a
  projection is a plain ``nn.Linear`` its state_dict keys are MultiheadAttention's own
  (``in_proj_weight``, ...), so a reference's weights load either way.
- torchvision's ``ShiftedWindowAttention``/``ShiftedWindowAttentionV2`` get the class
  :class:`ModularShiftedWindowAttention`/``...V2`` (same attributes and state_dict keys),
  whose forward is torchvision's ``shifted_window_attention`` with ``self.qkv(x)`` and
  ``self.proj(x)`` in place of ``F.linear`` on their weights.

MaxViT's attention (``to_qkv``, ``merge``) already calls its projections as modules.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from rankopt.core.errors import UnsupportedModuleError

__all__ = [
    "ModularMultiheadAttention",
    "ModularShiftedWindowAttention",
    "ModularShiftedWindowAttentionV2",
    "attention_projections",
    "modularize_attention",
    "needs_modularizing",
    "projection_view",
]

_SEPARATE = ("q_proj", "k_proj", "v_proj")


class ModularMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its projections as child modules.

    Same call signature and results as the module it replaces (``batch_first``, unbatched
    inputs, ``key_padding_mask``, ``attn_mask``, ``need_weights``,
    ``average_attn_weights``, ``is_causal``). In the packed form a cross-attention call
    (query, key, value not the same tensor) runs ``in_proj`` on each input and keeps the
    third it needs: exact, three times the projection's cost.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        batch_first: bool = False,
        packed: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.dropout = dropout
        self.batch_first = batch_first
        self.packed = packed
        # attributes nn.Transformer*Layer reads to choose its fused fast path; with no
        # packed in_proj_bias parameter it takes the ordinary path that calls forward
        self._qkv_same_embed_dim = packed
        self.in_proj_weight = None
        self.in_proj_bias = None
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        if packed:
            if self.kdim != embed_dim or self.vdim != embed_dim:
                raise ValueError("the packed form needs kdim == vdim == embed_dim")
            self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **kw)
        else:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
            self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
            self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.register_state_dict_post_hook(_save_native_keys)
        self.register_load_state_dict_pre_hook(_load_native_keys)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> ModularMultiheadAttention:
        """The same attention, sharing ``mha``'s parameters (no copy)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedModuleError(
                "nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True is not "
                "supported (its projections cannot be factorized); exclude its layers"
            )
        packed = bool(mha._qkv_same_embed_dim)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for key in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout", "batch_first"):
            setattr(new, key, getattr(mha, key))
        new.packed = packed
        new._qkv_same_embed_dim = packed
        new.in_proj_weight = None
        new.in_proj_bias = None
        new.bias_k = new.bias_v = None
        new.add_zero_attn = False
        for name, lin in _projection_linears(mha).items():
            setattr(new, name, lin)
        new.out_proj = mha.out_proj
        new.train(mha.training)
        new.register_state_dict_post_hook(_save_native_keys)
        new.register_load_state_dict_pre_hook(_load_native_keys)
        return new

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.packed:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
            return q, k, v
        e = self.embed_dim
        return (
            self.in_proj(query)[..., :e],
            self.in_proj(key)[..., e : 2 * e],
            self.in_proj(value)[..., 2 * e :],
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E), keeping identity for self-attention
            same_kv = key is value
            same_qk = query is key
            query = query.transpose(0, 1)
            key = query if same_qk else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        q, k, v = self._project(query, key, value)
        n, tgt, _ = q.shape
        src = k.shape[1]
        h, d = self.num_heads, self.head_dim
        q = q.reshape(n, tgt, h, d).transpose(1, 2)
        k = k.reshape(n, src, h, d).transpose(1, 2)
        v = v.reshape(n, src, h, d).transpose(1, 2)
        mask = _merged_mask(attn_mask, key_padding_mask, is_causal, n, h, tgt, src, q.dtype, q.device)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            out = F.dropout(weights, p=p, training=self.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, self.embed_dim))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _merged_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    n: int,
    h: int,
    tgt: int,
    src: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """One additive float mask broadcastable to (N, H, L, S), as MultiheadAttention merges them."""

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    if attn_mask is None and is_causal:
        attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=device).triu(1)
    merged = None
    if attn_mask is not None:
        merged = additive(attn_mask)
        merged = merged.view(1, 1, tgt, src) if merged.dim() == 2 else merged.view(n, h, tgt, src)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(n, 1, 1, src)
        merged = pad if merged is None else merged + pad
    return merged


def _projection_linears(mha: nn.MultiheadAttention) -> dict[str, nn.Linear]:
    """``mha``'s input projections as nn.Linear modules sharing its weight parameters."""
    e = mha.embed_dim
    bias = mha.in_proj_bias
    if mha._qkv_same_embed_dim:
        return {"in_proj": _linear_sharing(mha.in_proj_weight, bias)}
    out = {}
    for i, name in enumerate(_SEPARATE):
        weight = getattr(mha, f"{name}_weight")
        part = None
        if bias is not None:  # a slice of the packed bias: its own parameter from now on
            part = nn.Parameter(bias.detach()[i * e : (i + 1) * e].clone(), requires_grad=bias.requires_grad)
        out[name] = _linear_sharing(weight, part)
    return out


def _linear_sharing(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = weight
    lin.bias = bias
    return lin


def projection_view(mha: nn.MultiheadAttention, leaf: str) -> nn.Linear | None:
    """The input projection ``leaf`` (``in_proj`` or ``q_proj``/``k_proj``/``v_proj``) of a
    plain MultiheadAttention, as an nn.Linear sharing its parameters; None for other names."""
    if mha.bias_k is not None or mha.add_zero_attn:
        return None
    linears = _projection_linears(mha)
    if leaf not in linears:
        return None
    lin = linears[leaf]
    if leaf in _SEPARATE and mha.in_proj_bias is not None:  # share the bias slice too
        i = _SEPARATE.index(leaf)
        e = mha.embed_dim
        del lin._parameters["bias"]
        lin.register_buffer("bias", mha.in_proj_bias[i * e : (i + 1) * e], persistent=False)
    return lin


def _native_names(module: ModularMultiheadAttention) -> dict[str, str]:
    """``{module key: MultiheadAttention key}`` for the projections that are plain Linear."""
    names = {}
    if module.packed:
        if type(module.in_proj) is nn.Linear:
            names = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias"}
    else:
        for leaf in _SEPARATE:
            if type(getattr(module, leaf)) is nn.Linear:
                names[f"{leaf}.weight"] = f"{leaf}_weight"
    return names


def _separate_bias_native(module: ModularMultiheadAttention) -> bool:
    return not module.packed and all(
        type(getattr(module, leaf)) is nn.Linear and getattr(module, leaf).bias is not None
        for leaf in _SEPARATE
    )


def _save_native_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Rename plain-Linear projections' keys to MultiheadAttention's, in its key order."""
    assert isinstance(module, ModularMultiheadAttention)
    names = _native_names(module)
    merge_bias = _separate_bias_native(module)
    mine = [(k, state_dict.pop(k)) for k in [k for k in state_dict if k.startswith(prefix)]]
    items: list[tuple[str, Any]] = []
    biases = []
    for key, value in mine:
        local = key[len(prefix):]
        if merge_bias and local in {f"{leaf}.bias" for leaf in _SEPARATE}:
            biases.append(value)
            continue
        if merge_bias and local.startswith("out_proj.") and biases:
            items.append((prefix + "in_proj_bias", torch.cat(biases)))
            biases = []
        items.append((prefix + names.get(local, local), value))
    if biases:
        items.append((prefix + "in_proj_bias", torch.cat(biases)))
    state_dict.update(items)


def _load_native_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    assert isinstance(module, ModularMultiheadAttention)
    for ours, native in _native_names(module).items():
        if prefix + native in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + native)
    if _separate_bias_native(module) and prefix + "in_proj_bias" in state_dict:
        for leaf, part in zip(_SEPARATE, state_dict.pop(prefix + "in_proj_bias").chunk(3)):
            state_dict[f"{prefix}{leaf}.bias"] = part


# -- torchvision's Swin window attention ------------------------------------------------------

def _window_attention(module: nn.Module, x: Tensor, logit_scale: Tensor | None) -> Tensor:
    """torchvision's ``shifted_window_attention`` (0.29) with ``module.qkv``/``module.proj``
    called as modules; kept line for line so that it matches at full rank."""
    window_size, shift_size = module.window_size, list(module.shift_size)
    num_heads = module.num_heads
    relative_position_bias = module.get_relative_position_bias()
    b, height, width, c = x.shape
    pad_r = (window_size[1] - width % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - height % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    if window_size[0] >= pad_h:
        shift_size[0] = 0
    if window_size[1] >= pad_w:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    x = x.view(b, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * num_windows, window_size[0] * window_size[1], c)
    qkv = module.qkv(x)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * (c // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_h, pad_w))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for hs in h_slices:
            for ws in w_slices:
                attn_mask[hs[0] : hs[1], ws[0] : ws[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=module.attention_dropout, training=module.training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
    x = module.proj(x)
    x = F.dropout(x, p=module.dropout, training=module.training)
    x = x.view(b, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


def _swin_classes() -> tuple[type[nn.Module], type[nn.Module]] | None:
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
    except ImportError:  # torchvision is optional for models that do not use it
        return None
    return ShiftedWindowAttention, ShiftedWindowAttentionV2


def _loaded_swin_classes() -> tuple[type[nn.Module], type[nn.Module]] | None:
    """torchvision's Swin attention classes if torchvision's Swin module is loaded, else
    None: a model cannot hold one otherwise, and importing torchvision costs a second of
    every command's start."""
    if "torchvision.models.swin_transformer" not in sys.modules:
        return None
    return _swin_classes()


def _make_swin_subclasses() -> tuple[type[nn.Module], type[nn.Module]] | tuple[None, None]:
    classes = _swin_classes()
    if classes is None:
        return None, None
    v1, v2 = classes

    class ModularShiftedWindowAttention(v1):  # type: ignore[misc, valid-type]
        """torchvision's ShiftedWindowAttention calling ``qkv`` and ``proj`` as modules."""

        def forward(self, x: Tensor) -> Tensor:
            return _window_attention(self, x, None)

    class ModularShiftedWindowAttentionV2(v2):  # type: ignore[misc, valid-type]
        """torchvision's ShiftedWindowAttentionV2 calling ``qkv`` and ``proj`` as modules.

        torchvision zeroes the key third of the qkv bias on every call; here it is zeroed
        once when the module is converted (the same outputs), so a factorized ``qkv``'s
        bias may learn it in fine-tuning.
        """

        def forward(self, x: Tensor) -> Tensor:
            return _window_attention(self, x, self.logit_scale)

    for cls in (ModularShiftedWindowAttention, ModularShiftedWindowAttentionV2):
        cls.__module__ = __name__  # pickles as rankopt.compression.attention.<name>
        cls.__qualname__ = cls.__name__
    return ModularShiftedWindowAttention, ModularShiftedWindowAttentionV2


_swin_subclasses = functools.cache(_make_swin_subclasses)  # one pair of classes, made on first use


def _loaded_modular_swin_classes() -> tuple[type[nn.Module], ...]:
    """The modular Swin classes when torchvision's Swin module is loaded, else ``()``."""
    if _loaded_swin_classes() is None:
        return ()
    return tuple(c for c in _swin_subclasses() if c is not None)


def __getattr__(name: str) -> Any:
    # made on first use (and by pickle's lookup of a saved model), not at import
    if name == "ModularShiftedWindowAttention":
        return _swin_subclasses()[0]
    if name == "ModularShiftedWindowAttentionV2":
        return _swin_subclasses()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- finding and converting parents ------------------------------------------------------------

def _raw_kind(module: nn.Module) -> str | None:
    """'mha' or 'swin'/'swin_v2' for a parent that reads its projections' weights, else None."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    classes = _loaded_swin_classes()
    if classes is not None and type(module) in classes:
        return "swin_v2" if type(module) is classes[1] else "swin"
    return None


def needs_modularizing(model: nn.Module) -> bool:
    """Whether ``model`` holds an attention parent that :func:`modularize_attention` rewrites."""
    return any(_raw_kind(m) is not None for m in model.modules())


def modularize_attention(model: nn.Module) -> list[str]:
    """Rewrite, in place, every attention parent that reads its projections' weights into
    the equivalent module that calls them; the qualified names of those rewritten.

    Parameters are shared, not copied. A MultiheadAttention that cannot be rewritten
    (``add_bias_kv``/``add_zero_attn``) is left as it is.
    """
    done = []
    for name, module in list(model.named_modules()):
        kind = _raw_kind(module)
        if kind is None:
            continue
        if kind == "mha":
            try:
                new = ModularMultiheadAttention.from_module(module)  # type: ignore[arg-type]
            except UnsupportedModuleError:
                continue
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if not name:
                raise UnsupportedModuleError("the model itself is a MultiheadAttention; wrap it in a module")
            setattr(parent, leaf, new)
        elif kind == "swin":
            module.__class__ = _swin_subclasses()[0]
        else:
            if module.qkv.bias is not None:
                with torch.no_grad():
                    length = module.qkv.bias.numel() // 3
                    module.qkv.bias[length : 2 * length].zero_()
            module.__class__ = _swin_subclasses()[1]
        done.append(name)
    return done


def attention_projections(model: nn.Module) -> Iterator[tuple[str, str]]:
    """``(qualified name, parent type)`` of every projection of a modular attention parent."""
    swin = _loaded_modular_swin_classes()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, ModularMultiheadAttention):
            leaves = ("in_proj",) if module.packed else _SEPARATE
            for leaf in (*leaves, "out_proj"):
                yield prefix + leaf, type(module).__name__
        elif isinstance(module, swin):
            yield prefix + "qkv", type(module).__name__
            yield prefix + "proj", type(module).__name__
