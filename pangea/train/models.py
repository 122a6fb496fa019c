"""Built-in models (`mlp`, `cnn`, `gpt`) and user models given as `module:factory` or pickled code."""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pangea.errors import ModelError
from pangea.train import usercode


def mlp(in_features: int, num_classes: int, hidden: tuple[int, ...] = (128,)) -> nn.Module:
    """Flatten, then Linear+ReLU per hidden width, then a Linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- cnn


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) for a sample shaped (C, H, W), (H, W) or (D,) with D a perfect square."""
    shape = tuple(input_shape)
    if len(shape) == 1 and shape[0] > 0 and math.isqrt(shape[0]) ** 2 == shape[0]:
        side = math.isqrt(shape[0])  # flattened square images, e.g. scikit-learn's 8x8 digits
        shape = (1, side, side)
    elif len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[0] < 1 or min(shape[1:]) < 2:  # the 2x2 pool needs H, W >= 2
        raise ModelError(
            f"model 'cnn' needs samples shaped (C, H, W), (H, W) or (D,) with D a perfect square"
            f" and H, W >= 2; the dataset's are {tuple(input_shape)}"
        )
    return shape  # type: ignore[return-value]


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 conv+BatchNorm+ReLU layers, a 2x2 max-pool and a Linear classifier.

    The forward takes the batch as stored, (B, *input_shape): the reshape to images is inside.
    """
    channels, height, width = image_shape(input_shape)
    features = 32 * (height // 2) * (width // 2)
    return nn.Sequential(
        nn.Flatten(),  # with the Unflatten, one path for every accepted sample shape
        nn.Unflatten(1, (channels, height, width)),
        # No conv biases: the BatchNorm right after each conv has its own shift.
        nn.Conv2d(channels, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(features, num_classes),
    )


# ---------------------------------------------------------------- gpt


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which a position sees only itself and earlier positions."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (part.view(b, t, self.heads, d // self.heads).transpose(1, 2) for part in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: attention, then a 4x-wide GELU MLP, each residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def residual_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The Linears whose outputs are added to the residual stream."""
        return self.attn.proj, self.mlp[2]


class GPT(nn.Module):
    """A decoder-only transformer LM: token ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(self, vocab: int, context: int, layers: int, heads: int, dim: int) -> None:
        super().__init__()
        self.context = context
        self.token_embedding = nn.Embedding(vocab, dim)
        self.position_embedding = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        # Tied: one Parameter, so it is counted, averaged and sent once.
        self.lm_head.weight = self.token_embedding.weight
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        # GPT-2's scheme; the scaled residual projections keep the residual stream's variance
        # from growing with depth.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in block.residual_projections():
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"gpt takes token ids shaped (batch, tokens), got {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(
                f"gpt got {t} tokens per sequence but its context is {self.context}:"
                " use shorter windows or a larger --context"
            )
        positions = torch.arange(t, device=idx.device)
        x = self.token_embedding(idx) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.final_norm(x))


def gpt(input_shape: tuple[int, ...], vocab: int, *, layers: int, heads: int, dim: int) -> GPT:
    """A GPT for windows of `input_shape == (context,)` tokens, after checking the sizes."""
    if len(input_shape) != 1:
        raise ModelError(
            f"model 'gpt' needs samples of token ids shaped (context,), got {tuple(input_shape)}: check --context"
        )
    (context,) = input_shape
    sizes = {"--context": context, "--layers": layers, "--heads": heads, "--dim": dim}
    for flag, value in sizes.items():
        if value < 1:
            raise ModelError(f"{flag} must be at least 1, got {value}")
    if dim % heads:
        raise ModelError(f"--dim {dim} must be a multiple of --heads {heads}")
    if vocab < 1:
        raise ModelError(f"model 'gpt' needs a vocabulary of at least 1 token, got {vocab}")
    return GPT(vocab, context, layers, heads, dim)


# ---------------------------------------------------------------- building


def build_model(
    spec: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: tuple[int, ...],
    seed: int,
    *,
    layers: int = 2,
    heads: int = 4,
    dim: int = 128,
    code_dir: Path | None = None,
    allow_pickle: bool = True,
) -> nn.Module:
    """Build the model deterministically: the same arguments give the same initial weights.

    `hidden` shapes `mlp`; `layers`, `heads` and `dim` shape `gpt`, whose vocabulary is
    `num_classes`. A user factory `module:factory` (or `pickle:<sha256>`, kept in `code_dir`,
    loaded only if `allow_pickle`: see `pangea.train.usercode`) is called as
    `factory(in_features=..., num_classes=...)` when it accepts those keywords, otherwise
    with no arguments.  A shipped `nn.Module` instance gives a copy of itself, its weights as shipped.
    """
    in_features = math.prod(input_shape)
    torch.manual_seed(seed)
    if spec == "mlp":
        return mlp(in_features, num_classes, hidden)
    if spec == "cnn":
        return cnn(input_shape, num_classes)
    if spec == "gpt":
        return gpt(input_shape, num_classes, layers=layers, heads=heads, dim=dim)
    factory = _import_factory(spec, code_dir=code_dir, allow_pickle=allow_pickle)
    params = inspect.signature(factory).parameters
    kwargs = {}
    if "in_features" in params:
        kwargs["in_features"] = in_features
    if "num_classes" in params:
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - user code: report it in one line
        raise ModelError(f"{spec}({', '.join(kwargs)}) failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"{spec} has no trainable parameters")
    return model


def _import_factory(spec: str, *, code_dir: Path | None = None, allow_pickle: bool = True):
    """The factory `spec` names: `module:factory`, or pickled code; a model instance as a factory of its copies."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"unknown model {spec!r}: use 'mlp', 'cnn', 'gpt' or 'module:factory'")
    factory = usercode.resolve(spec, what="--model", error=ModelError, code_dir=code_dir, allow_pickle=allow_pickle)
    if isinstance(factory, nn.Module):
        return _copies(factory)
    if not callable(factory):
        if usercode.pickled_hash(spec):
            raise ModelError(f"--model {spec} is a {type(factory).__name__}, not a factory or a torch.nn.Module")
        raise ModelError(f"{module_name} has no callable {attr!r}")
    return factory


def _copies(model: nn.Module):
    """A factory of fresh copies of `model`: every build starts from its weights, and none shares them."""

    def copy_of_model() -> nn.Module:
        return copy.deepcopy(model)

    return copy_of_model


def build_for(spec, *, code_dir: Path | None = None, allow_pickle: bool = True) -> nn.Module:
    """The model a job spec describes (`pangea.wire.messages.JobSpec`, or anything with its
    model, input_shape, num_classes, hidden, seed, layers, heads and dim), its initial weights.

    Pickled code is loaded from `code_dir` only (the directory `pangea.roles.code.fetch_code`
    gives a worker), never from a path the spec names, and only if `allow_pickle`."""
    return build_model(
        spec.model,
        spec.input_shape,
        spec.num_classes,
        spec.hidden,
        spec.seed,
        layers=spec.layers,
        heads=spec.heads,
        dim=spec.dim,
        code_dir=code_dir,
        allow_pickle=allow_pickle,
    )
