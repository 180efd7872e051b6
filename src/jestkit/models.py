"""A small SigLIP dual encoder whose image tower is a FlexiViT.

Images are float tensors [B, C, H, W] (MNIST padded to 1 x 32 x 32, values in [0, 1]); text is
a LongTensor [B, L] of token ids with 0 as padding. Both towers end in an L2-normalised
embedding of size `embed_dim`; the model also holds the SigLIP temperature (stored as its log)
and bias, so `sigmoid_loss(*model(images, tokens))` is one training loss.

FlexiViT (Beyer et al., 2023): the image tower keeps one patch-embedding kernel at the base
patch size and resizes it on the fly with PI-resize, so the same weights run at any patch size
that divides the image size. JEST's Flexi variant scores at a coarse patch size (cheap) and
trains on a mix of fine and coarse (BRIEF 4).

Construction never touches torch's global RNG: every parameter is initialised from a
`torch.Generator` seeded by `seed` (or passed in), so two models built with the same seed are
bit-identical and building a model changes nothing for the caller's random streams.

Attention is written out as two matmuls instead of `F.scaled_dot_product_attention`: torch's
`FlopCounterMode` has no formula for the CPU flash-attention kernel and would silently count
attention as zero FLOPs (see `jestkit.flops`). The sequences here are at most 64 tokens at the
base patch size, so the explicit form costs nothing noticeable.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jestkit.atomic import atomic_write
from jestkit.scoring import check_device, check_embeddings, scalar_tensor

__all__ = [
    "CHECKPOINT_FORMAT",
    "Block",
    "DualEncoder",
    "DualEncoderConfig",
    "FlexiPatchEmbed",
    "ImageTower",
    "TextTower",
    "attention_softmax",
    "bilinear_resize_matrix",
    "check_fits_in_memory",
    "load_model",
    "memory_bytes",
    "model_fingerprint",
    "parameter_count",
    "pi_downsample_matrix",
    "pi_resize_matrix",
    "resize_pos_embed",
    "save_model",
    "short_softmax_keys",
    "sigmoid_loss",
]

#: Written into every checkpoint's metadata; `load_model` refuses anything else.
CHECKPOINT_FORMAT = "jestkit.dual_encoder.v1"
PAD_ID = 0


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def patch_sizes(image_size: int) -> tuple[int, ...]:
    """The patch sizes a ViT on image_size x image_size images accepts: its divisors."""
    return tuple(p for p in range(1, image_size + 1) if image_size % p == 0)


@dataclass(frozen=True)
class DualEncoderConfig:
    """Architecture of a `DualEncoder`. Plain data: `asdict` / `from_dict` round-trip via JSON.

    `patch_size` is the base (training) patch size at which the patch-embedding kernel and the
    positional embeddings are stored; other divisors of `image_size` are reached by resizing.
    """

    vocab_size: int
    embed_dim: int = 64
    image_width: int = 64
    image_depth: int = 2
    image_heads: int = 4
    patch_size: int = 4
    image_size: int = 32
    in_channels: int = 1
    text_width: int = 64
    text_depth: int = 2
    text_heads: int = 4
    max_text_len: int = 16
    mlp_ratio: int = 4
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float = -10.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("init_"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{f.name} must be a float, got {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"{f.name} must be finite, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{f.name} must be a positive int, got {value!r}")
        if self.vocab_size < 2:
            # id 0 is padding, so a usable vocabulary needs at least one more id.
            raise ValueError(f"vocab_size must be >= 2 (id 0 is padding), got {self.vocab_size}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by patch_size "
                f"({self.patch_size})"
            )
        for tower in ("image", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ValueError(
                    f"{tower}_width ({width}) must be divisible by {tower}_heads ({heads})"
                )

    @property
    def allowed_patch_sizes(self) -> tuple[int, ...]:
        """Patch sizes the image tower accepts: the divisors of `image_size`."""
        return patch_sizes(self.image_size)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): what checkpoints and fingerprints store."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> DualEncoderConfig:
        """Inverse of `asdict`; unknown keys are an error rather than silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DualEncoderConfig fields: {unknown}")
        return cls(**data)


def parameter_count(config: DualEncoderConfig) -> int:
    """How many parameters a `DualEncoder` of `config` has, without building it."""
    c = config

    def block(w: int) -> int:  # `Block`: two LayerNorms, qkv, proj, fc1, fc2
        hidden = c.mlp_ratio * w
        return 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * hidden + hidden) \
            + (hidden * w + w)

    wi, wt = c.image_width, c.text_width
    image = (wi * c.in_channels * c.patch_size**2 + wi  # patch embedding
             + (c.image_size // c.patch_size) ** 2 * wi  # positions
             + c.image_depth * block(wi) + 2 * wi + wi * c.embed_dim)  # blocks, norm, head
    text = (c.vocab_size * wt + c.max_text_len * wt
            + c.text_depth * block(wt) + 2 * wt + wt * c.embed_dim)
    return image + text + 2  # + log t and c


def memory_bytes() -> int | None:
    """This machine's memory and swap (what allocations can reach under Linux's default
    overcommit), or None where the OS does not say."""
    try:
        kib = {name: int(rest.split()[0]) for name, _, rest in (
            line.partition(":") for line in Path("/proc/meminfo").read_text().splitlines())
            if name in ("MemTotal", "SwapTotal")}
        total = 1024 * (kib["MemTotal"] + kib.get("SwapTotal", 0))
    except (OSError, KeyError, ValueError, IndexError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    return total if total > 0 else None  # sysconf says -1 when it cannot tell


def check_fits_in_memory(config: DualEncoderConfig, copies: int, what: str,
                         sizes: str | None = None) -> None:
    """Refuse, before any allocation, a model whose `copies` float32 copies of its parameters
    (1 to build it; 4 to train it: weights, gradients and AdamW's two moments) exceed this
    machine's memory and swap. Activations are not counted: a model that passes may still
    not fit, one that fails cannot. The message starts with `what` (whose model) and names
    `sizes` (the caller's own fields, e.g. "width=65536, depth=1"; default: every field of
    the config that sets a size)."""
    n = parameter_count(config)
    need, total = 4 * copies * n, memory_bytes()
    if total is not None and need > total:
        c = config
        sizes = sizes or ", ".join(
            f"{name}={getattr(c, name)}" for name in (
                "vocab_size", "embed_dim", "image_width", "image_depth", "patch_size",
                "image_size", "in_channels", "text_width", "text_depth", "max_text_len",
                "mlp_ratio"))
        held = {1: "its float32 weights",
                4: "training it (float32 weights, gradients and AdamW's two moments)"}.get(
                    copies, f"{copies} float32 copies of its parameters")
        raise ValueError(
            f"{what}: {sizes} make a model of {n:,} parameters; {held} need "
            f"{need / 2**30:,.1f} GiB, more than this machine's {total / 2**30:,.1f} GiB of "
            f"memory and swap. Use a smaller model.")


# --------------------------------------------------------------------------------------------
# FlexiViT resizing
# --------------------------------------------------------------------------------------------


def _resize_2d(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of [..., C, h, w] to [..., C, size, size] (half-pixel centres).

    Antialiased when shrinking, matching `jax.image.resize` as used by FlexiViT; when growing,
    antialiasing is a no-op, so this is plain `F.interpolate(..., align_corners=False)`.
    """
    return F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1]
    )


@functools.lru_cache(maxsize=64)
def bilinear_resize_matrix(old: int, new: int) -> Tensor:
    """B [new*new, old*old] (float64) with  resize(x).flatten() == B @ x.flatten().

    Built by resizing each basis image, so it is exactly the linear map `_resize_2d` applies
    to a single old x old patch. Cached and shared: treat the result as read-only.
    """
    with torch.inference_mode(False):  # cached: must stay usable by autograd (see _matrix)
        basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
        return _resize_2d(basis, new).reshape(old * old, new * new).T.contiguous()


@functools.lru_cache(maxsize=64)
def pi_resize_matrix(old: int, new: int) -> Tensor:
    """M [old*old, new*new] (float64) with  resized_kernel_flat = kernel_flat @ M.

    PI-resize: new_w = pinv(B^T) @ w. When growing (new >= old), B has full column rank so
    B^T pinv(B^T) = I and  <B x, new_w> = <x, w>  for every patch x: a bilinearly upsampled
    patch gives exactly the original token. When shrinking it is the least-squares solution.
    Cached per (old, new) since the patch size changes between calls; treat as read-only.
    """
    with torch.inference_mode(False):
        b = bilinear_resize_matrix(old, new)
        return torch.linalg.pinv(b.T).T.contiguous()


@functools.lru_cache(maxsize=64)
def pi_downsample_matrix(old: int, new: int) -> Tensor:
    """P [old, new] (float64), the 1-D factor of PI-resize when growing (new > old).

    Bilinear resizing is separable, so B = B1 (x) B1 and pinv(B) = P (x) P with P = pinv(B1);
    hence ``pi_resize_matrix(old, new) == kron(P, P)``, and the PI-resized kernel applied to
    a new x new patch X gives exactly the stored kernel applied to the old x old patch
    P X P^T. Computing tokens that way costs old*new*(new + old) multiply-adds per patch and
    channel plus the stored kernel's old*old*width, instead of new*new*width. Read-only.
    """
    if new <= old:
        raise ValueError(f"pi_downsample_matrix is for growing patches, got {old} -> {new}")
    with torch.inference_mode(False):
        basis = torch.eye(old, dtype=torch.float64).reshape(old, 1, old)
        b1 = F.interpolate(basis, size=new, mode="linear", align_corners=False)  # no antialias
        return torch.linalg.pinv(b1.reshape(old, new).T).contiguous()  # pinv([new, old])


def resize_pos_embed(pos: Tensor, new_grid: int) -> Tensor:
    """Resize positional embeddings [1, g*g, D] to [1, new_grid**2, D] (bilinear, 2-D grid)."""
    _, n, dim = pos.shape
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"pos must hold a square grid of tokens, got {n}")
    if grid == new_grid:
        return pos
    grid_img = pos.reshape(1, grid, grid, dim).permute(0, 3, 1, 2)  # [1, D, g, g]
    resized = _resize_2d(grid_img, new_grid)
    return resized.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim)


class FlexiPatchEmbed(nn.Module):
    """Patch embedding stored at one base patch size, applied at any allowed patch size.

    forward(images [B, C, S, S], patch_size) -> tokens [B, (S / patch_size)**2, width]
    (no positional embedding: that is the tower's job).
    """

    def __init__(self, in_channels: int, width: int, base_patch: int, image_size: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.base_patch = base_patch
        self.image_size = image_size
        self.weight = nn.Parameter(torch.empty(width, in_channels, base_patch, base_patch))
        self.bias = nn.Parameter(torch.empty(width))
        # Device/dtype copies of `pi_resize_matrix`, keyed by (patch, device, dtype), so a
        # training loop that alternates patch sizes never re-runs the pseudo-inverse.
        self._resize_cache: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}
        self._downsample_cache: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    @property
    def allowed_patch_sizes(self) -> tuple[int, ...]:
        """Divisors of the image size."""
        return patch_sizes(self.image_size)

    def check_patch_size(self, patch_size: int) -> None:
        """ValueError unless `patch_size` is an int dividing the image size."""
        allowed = self.allowed_patch_sizes
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or (
            patch_size not in allowed
        ):
            raise ValueError(
                f"patch_size must be one of {allowed} (the divisors of image_size="
                f"{self.image_size}), got {patch_size!r}"
            )

    def kernel(self, patch_size: int) -> Tensor:
        """The kernel [width, C, patch_size, patch_size], PI-resized from the stored one."""
        self.check_patch_size(patch_size)
        return self._kernel(patch_size)

    def _kernel(self, patch_size: int) -> Tensor:
        if patch_size == self.base_patch:
            return self.weight
        m = self._matrix(self._resize_cache, pi_resize_matrix, patch_size)
        width, chans = self.weight.shape[:2]
        flat = self.weight.reshape(width * chans, self.base_patch * self.base_patch)
        return (flat @ m).reshape(width, chans, patch_size, patch_size)

    def uses_downsample(self, patch_size: int) -> bool:
        """Whether `forward` at this patch size takes the separable path (P X P^T, then
        the stored kernel): patches larger than the base, when that costs fewer
        multiply-adds than the resized kernel. Both paths give the same tokens."""
        b, p = self.base_patch, patch_size
        width = self.weight.shape[0]
        return p > b and b * p * (p + b) + b * b * width < p * p * width

    def _matrix(self, cache: dict, build, patch_size: int) -> Tensor:
        """`build(base_patch, patch_size)` on the weight's device and dtype, made once."""
        key = (patch_size, self.weight.device, self.weight.dtype)
        m = cache.get(key)
        if m is None:
            # Built outside inference mode even when first asked for there (evaluation,
            # scoring): an inference tensor, once cached, could never be saved for backward,
            # and every later training step at this patch size would fail.
            with torch.inference_mode(False):
                m = build(self.base_patch, patch_size).to(device=self.weight.device,
                                                          dtype=self.weight.dtype)
            cache[key] = m
        return m

    def check_images(self, images: object, patch_size: int) -> None:
        """ValueError unless `images` is a [B, C, S, S] floating tensor of this embedding's
        channels and weight dtype, with S a multiple of `patch_size` (a float64 or uint8
        batch would fail deep in a matmul; a size the patch does not divide, in a reshape).
        S may differ from image_size: the embedding cuts any such image into patches (an
        image upsampled k times, at k times the patch, gives the same tokens). Under
        autocast any floating dtype is let through: autocast casts the matmuls itself."""
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a Tensor [B, {self.in_channels}, S, S], got "
                            f"{type(images).__name__}")
        if (images.ndim != 4 or images.shape[1] != self.in_channels
                or images.shape[2] != images.shape[3] or images.shape[2] % patch_size):
            raise ValueError(f"images must have shape [B, {self.in_channels}, S, S] with S a "
                             f"multiple of patch_size={patch_size}, got {tuple(images.shape)}")
        dtype = self.weight.dtype
        if images.dtype != dtype and not (
                images.is_floating_point() and torch.is_autocast_enabled(images.device.type)):
            raise ValueError(f"images must be {dtype} like the model's weights, got "
                             f"{images.dtype}: convert them (images.to({dtype}); pixels as "
                             f"floats, e.g. uint8 / 255), or the model (model.to(dtype))")

    def forward(self, images: Tensor, patch_size: int | None = None) -> Tensor:
        p = self.base_patch if patch_size is None else patch_size
        self.check_patch_size(p)
        self.check_images(images, p)
        batch, chans, size, _ = images.shape
        grid = size // p
        if self.uses_downsample(p):
            # PI-resize with a coarse patch is "shrink each patch by P X P^T, apply the stored
            # kernel" (see `pi_downsample_matrix`): the same tokens for a fraction of the
            # multiply-adds, which matters when few tokens make the patch embedding a large
            # share of a coarse forward (Flexi scoring).
            down = self._matrix(self._downsample_cache, pi_downsample_matrix, p)  # [b, p]
            b = self.base_patch
            # Columns, then rows; both matmuls read their input in place (no permute copy).
            x = images.reshape(batch, chans, size, grid, p) @ down.T  # [B, C, S, g, b]
            x = down @ x.reshape(batch, chans, grid, p, grid * b)  # [B, C, g, b, g*b]
            patches = (x.reshape(batch, chans, grid, b, grid, b)
                       .permute(0, 2, 4, 1, 3, 5)
                       .reshape(batch, grid * grid, chans * b * b))  # [B, (S/p)^2, C*b*b]
            kernel = self.weight.reshape(self.weight.shape[0], chans * b * b)
            return patches @ kernel.T + self.bias
        # Non-overlapping patches: "flatten each patch, one matmul" is exactly a stride-p
        # convolution, and on CPU several times faster than conv2d's backward.
        kernel = self._kernel(p)
        patches = (images.reshape(batch, chans, grid, p, grid, p)
                   .permute(0, 2, 4, 1, 3, 5)
                   .reshape(batch, grid * grid, chans * p * p))  # [B, (S/p)^2, C*p*p]
        kernel = kernel.reshape(self.weight.shape[0], chans * p * p)
        return patches @ kernel.T + self.bias


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------


# torch's CPU softmax over a last axis shorter than one vector register of float32 lanes (16
# with AVX-512, 8 with AVX2) takes a slow path whose cost grows with the axis; over a whole
# register or more its kernel is the faster one. `attention_softmax` does exp/sum itself on the
# key lengths where that measured faster, which is where the text tower's 8-token and the
# coarse image tower's 4-token attention fall when a 320-pair super-batch is scored.
# Measured with benchmarks/softmax_paths.py (which sweeps the key axis), forward + backward:
# - AVX-512 (an earlier development machine): exp/sum 4-5x faster in forward and 1.4-2.6x in
#   backward at 4 and 8 keys, torch's kernel faster from 16 (shorter axes not measured);
# - AVX2 (this round's): exp/sum 0.5-0.9x torch's time at 4-7 keys, but 1.2-2.4x at 1-3 keys,
#   2.5x at 8 and 1.3-1.6x at 9-15: torch's kernel leaves its slow path at 8 there.
# Elsewhere (no vector unit torch knows, another architecture) nothing was measured, and
# torch's kernel is always used.
_SHORT_SOFTMAX_KEYS = {"AVX512": range(1, 16), "AVX2": range(4, 8)}


def short_softmax_keys(cpu_capability: str) -> range:
    """The key-axis lengths on which `attention_softmax` does exp/sum itself on a CPU of this
    capability (as ``torch.backends.cpu.get_cpu_capability()`` names it); empty (always
    torch's kernel) where unmeasured."""
    return _SHORT_SOFTMAX_KEYS.get(cpu_capability, range(0))


SHORT_SOFTMAX_KEYS = short_softmax_keys(torch.backends.cpu.get_cpu_capability())


class _ShortSoftmax(torch.autograd.Function):
    """softmax(x, dim=-1) from a few whole-tensor ops: subtract the row max, exp, divide by
    the row sum (the same algorithm as torch's kernel). Backward: y * (g - sum(g * y)), from
    differentiable ops on the saved output, so double backward (gradient penalties) is right
    too. In the form torch.func's transforms accept (forward without ctx, setup_context), so
    models that use it can be vmapped (as benchmarks/batched_runs.py does over stacked
    weights)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        y = (x - x.amax(dim=-1, keepdim=True)).exp_()
        return y.div_(y.sum(dim=-1, keepdim=True))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return y * (grad - (grad * y).sum(dim=-1, keepdim=True))


def attention_softmax(scores: Tensor) -> Tensor:
    """softmax over the last axis (attention scores [..., L_query, L_key]; masked keys at -inf,
    at least one unmasked key per row). Equal to ``scores.softmax(-1)`` up to float rounding,
    faster on CPU when L_key is in SHORT_SOFTMAX_KEYS (chosen from the machine's vector unit).
    Half-precision scores keep torch's kernel, which accumulates in float32."""
    if (scores.shape[-1] in SHORT_SOFTMAX_KEYS and scores.device.type == "cpu"
            and scores.dtype in (torch.float32, torch.float64)):
        return _ShortSoftmax.apply(scores)
    return scores.softmax(dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x)).

    forward(x [B, L, width], key_mask [B, L] bool (True = attend) or None) -> [B, L, width]
    Every row of `key_mask` must allow at least one key (else softmax of all -inf is NaN).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def attention(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        batch, length, width = x.shape
        head_dim = width // self.heads
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, L, head_dim]
        scores = (q @ k.transpose(-2, -1)) * head_dim**-0.5  # [B, H, L, L]
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        out = attention_softmax(scores) @ v  # [B, H, L, head_dim]
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = x + self.attention(self.norm1(x), key_mask)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ImageTower(nn.Module):
    """FlexiViT: patch embed + resized pos emb + blocks + LN + mean pool + projection.

    forward(images [B, C, S, S], patch_size | None) -> [B, embed_dim] (not normalised)
    """

    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.base_grid = c.image_size // c.patch_size
        self.patch_embed = FlexiPatchEmbed(c.in_channels, c.image_width, c.patch_size, c.image_size)
        self.pos_embed = nn.Parameter(torch.empty(1, self.base_grid**2, c.image_width))
        self.blocks = nn.ModuleList(
            Block(c.image_width, c.image_heads, c.mlp_ratio) for _ in range(c.image_depth)
        )
        self.norm = nn.LayerNorm(c.image_width)
        self.head = nn.Linear(c.image_width, c.embed_dim, bias=False)

    def forward(self, images: Tensor, patch_size: int | None = None) -> Tensor:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if isinstance(images, Tensor) and (images.ndim != 4
                                           or tuple(images.shape[1:]) != expected):
            raise ValueError(f"images must have shape [B, {', '.join(map(str, expected))}], "
                             f"got {tuple(images.shape)}")
        p = c.patch_size if patch_size is None else patch_size
        # patch_embed validates p, the type and the dtype: [B, (S/p)^2, width]
        return self.encode_patches(self.patch_embed(images, p), c.image_size // p)

    def encode_patches(self, patches: Tensor, grid: int) -> Tensor:
        """The tower after its patch embedding: patch tokens [B, grid^2, width] in row-major
        order -> image embeddings [B, embed_dim] (not normalised), the position embeddings
        resized to grid x grid."""
        x = patches + resize_pos_embed(self.pos_embed, grid)
        for block in self.blocks:
            x = block(x)
        # Global average pooling: works at every token count, unlike a CLS token whose
        # attention pattern would have to generalise across grid sizes.
        return self.head(self.norm(x).mean(dim=1))


class TextTower(nn.Module):
    """Token + learned position embeddings, masked blocks, LN, masked mean pool, projection.

    forward(tokens [B, L] int, L <= max_text_len, 0 = padding) -> [B, embed_dim]
    """

    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.text_width)
        self.pos_embed = nn.Parameter(torch.empty(1, c.max_text_len, c.text_width))
        self.blocks = nn.ModuleList(
            Block(c.text_width, c.text_heads, c.mlp_ratio) for _ in range(c.text_depth)
        )
        self.norm = nn.LayerNorm(c.text_width)
        self.head = nn.Linear(c.text_width, c.embed_dim, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        c = self.config
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an int64/int32 tensor [B, L], got "
                             f"{tokens.dtype} {tuple(tokens.shape)}")
        length = tokens.shape[1]
        if not 1 <= length <= c.max_text_len:
            raise ValueError(f"token length must be in [1, max_text_len={c.max_text_len}], "
                             f"got {length}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= c.vocab_size):
            raise ValueError(f"token ids must be in [0, vocab_size={c.vocab_size})")
        valid = tokens != PAD_ID  # [B, L]
        # An all-padding row would mask every key (softmax of all -inf = NaN); let it attend
        # to position 0 instead. Its pooled vector is 0 below, so its embedding is a constant.
        first = torch.zeros_like(valid)
        first[:, 0] = True
        key_mask = valid | (first & ~valid.any(dim=1, keepdim=True))
        x = self.token_embed(tokens) + self.pos_embed[:, :length]
        for block in self.blocks:
            x = block(x, key_mask)
        weights = valid.to(x.dtype).unsqueeze(-1)  # [B, L, 1]
        pooled = (self.norm(x) * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.head(pooled)


# --------------------------------------------------------------------------------------------
# Dual encoder, loss
# --------------------------------------------------------------------------------------------


MAX_MODEL_SEED = 2**63 - 1  # torch.Generator.manual_seed's range (a negative one wraps)


class DualEncoder(nn.Module):
    """SigLIP dual encoder with a FlexiViT image tower.

    Parameters `logit_scale_log` (log t, init log 10) and `logit_bias` (c, init -10) are 0-d.
    Build deterministically from `seed`, or from `generator` (which is then advanced);
    torch's global RNG is neither read nor changed.
    """

    def __init__(
        self,
        config: DualEncoderConfig,
        *,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, DualEncoderConfig):
            raise TypeError(f"config must be a DualEncoderConfig, got {type(config).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        if generator is None and (isinstance(seed, bool) or not isinstance(seed, int)
                                  or not 0 <= seed <= MAX_MODEL_SEED):
            raise ValueError(f"seed must be an int in [0, {MAX_MODEL_SEED}], got {seed!r}")
        check_fits_in_memory(config, 1, "DualEncoder")  # not an allocator error from torch
        self.config = config
        # nn.Linear & co. draw their default init from the global RNG; run that on a forked
        # copy so the caller's stream is untouched. The draws are overwritten just below.
        with torch.random.fork_rng(devices=[]):
            self.image = ImageTower(config)
            self.text = TextTower(config)
        self.logit_scale_log = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        self._init_weights(generator)

    @torch.no_grad()
    def _init_weights(self, gen: torch.Generator) -> None:
        done: set[int] = set()

        def normal(p: Tensor, std: float) -> None:
            # Normal truncated at 2 std (the usual ViT choice: no rare huge initial weights),
            # by inverse CDF: one uniform draw per element. (torch 2.13's trunc_normal_
            # resamples in a loop; it made building a model take ~1 s instead of ~30 ms.)
            edge = math.erf(2.0 / math.sqrt(2.0))  # 2 * Phi(2) - 1
            p.uniform_(-edge, edge, generator=gen).erfinv_().mul_(std * math.sqrt(2.0))
            done.add(id(p))

        def const(p: Tensor, value: float) -> None:
            p.fill_(value)
            done.add(id(p))

        c = self.config
        # Fixed module order (named_modules is deterministic), so a seed fixes every value.
        for _, module in self.named_modules():
            if isinstance(module, nn.Linear):
                normal(module.weight, 0.02)
                if module.bias is not None:
                    const(module.bias, 0.0)
            elif isinstance(module, nn.LayerNorm):
                const(module.weight, 1.0)
                const(module.bias, 0.0)
            elif isinstance(module, nn.Embedding):
                normal(module.weight, 0.02)
        pe = self.image.patch_embed
        normal(pe.weight, pe.weight[0].numel() ** -0.5)  # LeCun: unit-scale tokens from pixels
        const(pe.bias, 0.0)
        normal(self.image.pos_embed, 0.02)
        normal(self.text.pos_embed, 0.02)
        # Output projections at width^-0.5 so initial embeddings are not all near-parallel.
        normal(self.image.head.weight, c.image_width**-0.5)
        normal(self.text.head.weight, c.text_width**-0.5)
        const(self.logit_scale_log, c.init_logit_scale)
        const(self.logit_bias, c.init_logit_bias)
        missed = [n for n, p in self.named_parameters() if id(p) not in done]
        if missed:  # guard for future edits: an uninitialised weight breaks determinism
            raise RuntimeError(f"parameters without explicit init: {missed}")

    @property
    def logit_scale(self) -> Tensor:
        """The temperature t = exp(logit_scale_log), already exponentiated (as open_clip)."""
        return self.logit_scale_log.exp()

    def encode_image(self, images: Tensor, patch_size: int | None = None) -> Tensor:
        """images [B, C, S, S] -> L2-normalised embeddings [B, embed_dim]."""
        return F.normalize(self.image(images, patch_size), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """tokens [B, L] (0 = padding) -> L2-normalised embeddings [B, embed_dim]."""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(
        self, images: Tensor, tokens: Tensor, patch_size: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> (image_emb [B, D], text_emb [B, D], logit_scale t (0-d), logit_bias c (0-d))."""
        return (
            self.encode_image(images, patch_size),
            self.encode_text(tokens),
            self.logit_scale,
            self.logit_bias,
        )


def sigmoid_loss(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float
) -> Tensor:
    """SigLIP batch loss: sum over all N^2 pairs of -log sigmoid(y_ij (t u_i.v_j + c)), / N.

    image_emb, text_emb: [N, D]; logit_scale: t, already exponentiated; y_ii = +1, else -1.
    Computed in float32 (float64 if an embedding is float64) whatever the input dtype.
    The training loss, called every step: its checks read shapes and types only (a check of
    t's value would wait for the GPU each step).
    """
    check_embeddings(image_emb, text_emb, finite=False)
    dtype = torch.float64 if torch.float64 in (image_emb.dtype, text_emb.dtype) else torch.float32
    u, v = image_emb.to(dtype), text_emb.to(dtype)
    # Shapes and types only, keeping t's gradient: scoring's _as_scalar would read the value
    # (a GPU sync every step).
    t = scalar_tensor(logit_scale, "logit_scale", u.dtype, u.device)
    c = scalar_tensor(logit_bias, "logit_bias", u.dtype, u.device)
    n = u.shape[0]
    logits = t * (u @ v.T) + c  # [N, N]
    labels = 2.0 * torch.eye(n, dtype=dtype, device=u.device) - 1.0
    return -F.logsigmoid(labels * logits).sum() / n


# --------------------------------------------------------------------------------------------
# Checkpoints and identity
# --------------------------------------------------------------------------------------------


def _cpu_state(model: DualEncoder) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_model(model: DualEncoder, path: str | os.PathLike) -> None:
    """Write weights + config (safetensors metadata) to `path`, atomically.

    A reader sees the old file or the complete new one, never a torn write, and a crash
    leaves no partial checkpoint under the final name (`jestkit.atomic.atomic_write`).
    """
    path = Path(path)
    state = _cpu_state(model)
    # The fingerprint goes with the tensors: safetensors has no checksum of its own, and a
    # flipped bit in a weight would otherwise load as a (silently) different model.
    metadata = {"format": CHECKPOINT_FORMAT, "config": model.config.to_json(),
                "fingerprint": _fingerprint(model.config, state)}
    data = safetensors.torch.save(state, metadata=metadata)
    atomic_write(path, data)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> DualEncoder:
    """Rebuild a `DualEncoder` from a `save_model` checkpoint (config from its metadata),
    every tensor in the dtype it was saved in, on `device`."""
    device = check_device(device, instead="load it on device='cpu'")
    if not Path(path).is_file():
        what = " (a directory: give the .safetensors file in it)" if Path(path).is_dir() else ""
        raise FileNotFoundError(f"no model checkpoint at {path}{what}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except safetensors.SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file ({err})") from None
    if metadata.get("format") != CHECKPOINT_FORMAT or "config" not in metadata:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint "
                         f"(metadata format={metadata.get('format')!r})")
    try:
        raw = json.loads(metadata["config"])
        if not isinstance(raw, dict):
            raise TypeError(f"a JSON {type(raw).__name__}, not an object")
        config = DualEncoderConfig.from_dict(raw)
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: the model config in its metadata is damaged or not this "
                         f"version's ({type(err).__name__}: {err})") from None
    check_fits_in_memory(config, 1, str(path))  # before reading its tensors
    state = safetensors.torch.load_file(str(path))
    model = DualEncoder(config)
    # Keep each tensor's saved precision (and so the fingerprint): load_state_dict would
    # cast them all into the new model's float32, a bfloat16 tower included.
    with torch.no_grad():
        for name, tensor in (*model.named_parameters(), *model.named_buffers()):
            stored = state.get(name)
            if (stored is not None and stored.is_floating_point()
                    and tensor.is_floating_point() and stored.dtype != tensor.dtype):
                tensor.data = tensor.data.to(stored.dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # missing, unexpected or misshaped tensors
        what = "; ".join(line.strip() for line in str(err).splitlines()[1:])
        raise ValueError(f"{path}: its tensors do not fit the model its metadata describes "
                         f"(altered?): {what}") from None
    saved = metadata.get("fingerprint")  # absent from files written before it was saved
    if saved is not None and model_fingerprint(model) != saved:
        raise ValueError(f"{path}: its tensors do not match the fingerprint saved with them: "
                         f"altered or damaged since it was written")
    return model.to(device)


def model_fingerprint(model: DualEncoder) -> str:
    """sha256 hex of the config JSON and every state tensor (name, dtype, shape, bytes).

    Tensors are taken in sorted-name order and each field is length-prefixed, so the digest
    is independent of device and of dict order, and no two different models collide by
    concatenation. Used to tie cached embeddings to the exact model that made them.
    """
    return _fingerprint(model.config, _cpu_state(model))


def _fingerprint(config: DualEncoderConfig, state: dict[str, Tensor]) -> str:
    h = hashlib.sha256()

    def put(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    put(CHECKPOINT_FORMAT.encode())
    put(config.to_json().encode())
    for name in sorted(state):
        t = state[name]
        put(name.encode())
        put(str(t.dtype).encode())
        put(json.dumps(list(t.shape)).encode())
        # Viewing as bytes works for every dtype (bfloat16 has no numpy equivalent).
        put(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
