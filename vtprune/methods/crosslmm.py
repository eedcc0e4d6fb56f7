"""CrossLMM (Yan et al., 2025, "CrossLMM: Decoupling Long Video Sequences from LMMs via Dual Cross-Attention
Mechanisms", arXiv 2505.17020): pooled visual tokens in the LLM, and trainable cross-attention back to the
unpooled ones.

Before the LLM each image's tokens are pooled as by :mod:`vtprune.methods.pool` (same options). Inside
the LLM, every ``every``-th decoder layer (layers ``0, every, 2 every, ...``) gets a *dual cross-attention*
adapter after its self-attention. Its keys and values are the image's *unpooled* visual features (the
projected features the LLM would have seen), kept aside once per prefill - not in the sequence, not in the
KV cache - so the memory held per sample is the pooled cache plus one copy of the features:

* **V2V**: the pooled visual tokens query the unpooled ones;
* **T2V**: the text tokens (prompt and generated) query the unpooled ones;

each path ``h += tanh(g) * o(Attn(q(LN(h)), k(LN'(V)), v(LN'(V))))`` with its own projections and scalar
gate ``g`` initialised at 0, so untrained adapters compute exactly what plain pooling computes. Each token
attends to every visual feature of its own sample (all its images). The adapters are trained with the
model frozen (``vtprune train-crosslmm``, :mod:`vtprune.tune.crosslmm`) and saved beside the model in
``vtprune_crosslmm/`` (``adapters.safetensors`` + ``adapters.json``).

At decode the new token uses only the T2V path, computed in the *absorbed* form that reads the one kept
copy: per head ``softmax((W_k^T q) V^T) V W_v^T`` instead of projecting all keys and values again (the
same function; it is chosen whenever the queries are few: ``queries x heads < dim``).

Deviations from the paper (which trains a new LMM end to end; no code was released): adapters are added
to a frozen pretrained model; the LLM is pre-norm, so the adapters are gated residual branches on the
residual stream after self-attention (the paper writes ``LayerNorm(SelfAttn(I) + I)`` then the cross
attentions); the query and key/value LayerNorms are the adapter's own; V2V and T2V have separate gates
(whether the paper shares ``gamma`` is not stated); pooling runs after the projector (see ``pool``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..registry import register_method
from ..runtime.adapters import AdapterContext, Adapters
from ..runtime.parts import MethodParts
from .pool import PoolConfig, pool_transform

__all__ = [
    "CrossLMMConfig",
    "CrossAttention",
    "DualCrossAttention",
    "CrossLMMAdapters",
    "adapters_folder",
    "ADAPTERS_DIRNAME",
]

ADAPTERS_DIRNAME = "vtprune_crosslmm"


@dataclasses.dataclass
class CrossLMMConfig(PoolConfig):
    """Args:
    tokens, keep_ratio, anchor, positions: the pooling, as :class:`~vtprune.methods.pool.PoolConfig`.
    adapters: folder with trained adapters (``adapters.safetensors`` + ``adapters.json``); ``None`` looks
        for ``<model folder>/vtprune_crosslmm`` (where ``vtprune train-crosslmm`` saves them). A
        :class:`CrossLMMAdapters` object is also accepted (used as is, e.g. while training; such a config
        does not serialise to JSON).
    """

    method = "crosslmm"

    adapters: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.adapters is not None and not isinstance(self.adapters, (str, Path, CrossLMMAdapters)):
            raise UsageError(
                f"adapters must be a folder path, a CrossLMMAdapters or None, got {self.adapters!r}"
            )


class CrossAttention(nn.Module):
    """One gated cross-attention path: ``tanh(gate) * o(Attn(q(x), k(V), v(V)))``, no biases."""

    def __init__(self, hidden: int, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise UsageError(f"adapter dim {dim} is not a multiple of heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(hidden, dim, bias=False)
        self.k = nn.Linear(hidden, dim, bias=False)
        self.v = nn.Linear(hidden, dim, bias=False)
        self.o = nn.Linear(dim, hidden, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, feats: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x: ``(B, S, hidden)`` normalised queries; feats: ``(B, N, hidden)`` normalised keys/values;
        key_mask: ``(B, N)`` bool (every row with at least one True)."""
        b, s, width = x.shape
        n, h, d = feats.shape[1], self.heads, self.head_dim
        dim = h * d
        q = self.q(x).view(b, s, h, d).transpose(1, 2)  # (B, H, S, d)
        # Multiply-adds: absorbed 2 S width (dim + H N); projected 2 N dim (width + S). Few queries (decode)
        # read the kept features directly with W_k / W_v folded into the query and the output.
        if s * width * (dim + h * n) < n * dim * (width + s):
            wk = self.k.weight.view(h, d, -1)
            wv = self.v.weight.view(h, d, -1)
            scores = torch.einsum("bhse,bne->bhsn", torch.einsum("bhsd,hde->bhse", q, wk), feats)
            scores = (scores * d**-0.5).masked_fill(~key_mask[:, None, None, :], float("-inf"))
            context = torch.einsum("bhsn,bne->bhse", scores.softmax(-1), feats)
            out = torch.einsum("bhse,hde->bhsd", context, wv)
        else:
            k = self.k(feats).view(b, n, h, d).transpose(1, 2)
            v = self.v(feats).view(b, n, h, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return torch.tanh(self.gate) * self.o(out.transpose(1, 2).reshape(b, s, dim))


class DualCrossAttention(nn.Module):
    """The adapter of one decoder layer: V2V for the pooled visual tokens, T2V for every other token."""

    def __init__(self, hidden: int, dim: int, heads: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.kv_norm = nn.LayerNorm(hidden, eps=eps)
        self.v2v = CrossAttention(hidden, dim, heads)
        self.t2v = CrossAttention(hidden, dim, heads)

    def forward(self, hidden: torch.Tensor, context: AdapterContext) -> torch.Tensor:
        feats = self.kv_norm(context.features.to(hidden.dtype))
        has = context.feature_mask.any(-1)  # samples without images: attend to padding, output zeroed
        key_mask = context.feature_mask | ~has[:, None]
        x = self.norm(hidden)
        delta = self.t2v(x, feats, key_mask)
        if context.visual is not None:
            delta = torch.where(context.visual[..., None], self.v2v(x, feats, key_mask), delta)
        keep = has[:, None, None] if context.real is None else has[:, None, None] & context.real[..., None]
        return delta * keep.to(delta.dtype)


class CrossLMMAdapters(nn.Module):
    """The adapters of one model: a :class:`DualCrossAttention` per chosen decoder layer."""

    def __init__(
        self,
        hidden: int,
        num_layers: int,
        every: int = 4,
        dim: int | None = None,
        heads: int = 4,
        eps: float = 1e-5,
        meta: dict | None = None,
    ):
        super().__init__()
        if every < 1:
            raise UsageError(f"every must be >= 1, got {every}")
        self.hidden, self.num_layers, self.every = hidden, num_layers, every
        self.dim, self.heads, self.eps = dim or hidden, heads, eps
        self.layers = list(range(0, num_layers, every))
        self.meta = dict(meta or {})  # free-form training facts saved with the weights
        self.blocks = nn.ModuleDict(
            {str(i): DualCrossAttention(hidden, self.dim, heads, eps) for i in self.layers}
        )

    @classmethod
    def for_model(cls, model, every: int = 4, dim: int | None = None, heads: int | None = None, **kwargs):
        """Fresh adapters (gates at 0) shaped for ``model``'s language model (heads: the LLM's)."""
        text = model.config.get_text_config()
        layers = text.num_hidden_layers
        adapters = cls(text.hidden_size, layers, every, dim, heads or text.num_attention_heads, **kwargs)
        param = next(model.parameters())
        return adapters.to(device=param.device, dtype=param.dtype)

    def parts(self) -> Adapters:
        return Adapters({i: self.blocks[str(i)] for i in self.layers})

    def config_dict(self) -> dict:
        return {
            "hidden": self.hidden,
            "num_layers": self.num_layers,
            "every": self.every,
            "dim": self.dim,
            "heads": self.heads,
            "eps": self.eps,
            "layers": self.layers,
            "meta": self.meta,
        }

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, folder / "adapters.safetensors")
        (folder / "adapters.json").write_text(json.dumps(self.config_dict(), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> CrossLMMAdapters:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "adapters.json").is_file() or not (folder / "adapters.safetensors").is_file():
            raise UsageError(
                f"no CrossLMM adapters in {folder}; train them with `vtprune train-crosslmm --model <model "
                "folder>` or pass CrossLMMConfig(adapters=<folder>)"
            )
        meta = json.loads((folder / "adapters.json").read_text())
        layers = meta.pop("layers")
        adapters = cls(**meta)
        if adapters.layers != layers:
            raise UsageError(
                f"{folder}/adapters.json lists layers {layers}, every={adapters.every} gives others"
            )
        adapters.load_state_dict(load_file(folder / "adapters.safetensors"))
        return adapters.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def prefill_macs(self, tokens: int, features: int) -> float:
        """Multiply-accumulates of all adapters at a prefill of ``tokens`` LLM tokens reading ``features``
        kept-aside visual features (projected form, both paths on every token; norms not counted): per
        layer and path ``2 N d_model dim`` (keys, values) ``+ 2 S d_model dim`` (query, output) ``+ 2 S N dim``."""
        per_path = 2 * features * self.hidden * self.dim + 2 * tokens * self.hidden * self.dim
        per_path += 2 * tokens * features * self.dim
        return float(2 * per_path * len(self.layers))


def adapters_folder(model) -> Path:
    """Where adapters live beside a model loaded from a local folder (``<folder>/vtprune_crosslmm``)."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not source or not Path(source).is_dir():
        raise UsageError(
            "CrossLMM adapters are looked up beside the model, but this model was not loaded from a local "
            "folder; pass adapters=<folder saved by `vtprune train-crosslmm`> (or --out when training)"
        )
    return Path(source) / ADAPTERS_DIRNAME


@register_method(CrossLMMConfig)
def _parts(config: CrossLMMConfig, family) -> MethodParts:
    model = family.model
    adapters = config.adapters
    if not isinstance(adapters, CrossLMMAdapters):
        adapters = CrossLMMAdapters.load(adapters if adapters is not None else adapters_folder(model))
        param = next(model.parameters())
        adapters = adapters.to(device=param.device, dtype=param.dtype)
    text = model.config.get_text_config()
    layers = len(family.decoder_layers)
    if adapters.hidden != text.hidden_size or adapters.num_layers != layers:
        raise UsageError(
            f"these adapters were made for a {adapters.num_layers}-layer LLM of width {adapters.hidden}; "
            f"the model has {layers} layers of width {text.hidden_size}"
        )
    return MethodParts(
        transform=pool_transform(config), adapters=adapters.parts(), positions=config.positions
    )
