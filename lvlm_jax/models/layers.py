"""Building blocks shared by the vision tower, the decoder and the connectors.

Every parameter is created with logical axis names (see DESIGN.md, "Logical axes") so that
`lvlm_jax.sharding` can map it to a mesh without knowing the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.interpreters import ad

Array = jax.Array
Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str | Dtype) -> Dtype:
    """Maps a config string ('float32', 'bfloat16') to a jnp dtype."""
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[name]
    return name


def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


# The exact forms matter for parity with the reference implementations: CLIP uses quick GELU,
# LLaVA's projector the exact erf GELU, SigLIP and Gemma the tanh approximation.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def param_init(init: Callable, names: Sequence[str | None]) -> Callable:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, tuple(names))


# "auto" is resolved per target platform by models.vlm.for_platform.
DENSE_KERNELS = ("auto", "xla", "cpu")
# The variable collection of LoRA adapters (lvlm_jax/train/lora.py builds it): under a dense
# layer's own path, "kernel" -> {"a": [..., in, r], "b": [..., r, out]}, b already scaled by
# alpha / r. Scanned stacks scan it with their params (leading `layers` axes).
ADAPTERS = "lora"
SCANNED_COLLECTIONS = {"params": 0, ADAPTERS: 0}


class Dense(nn.DenseGeneral):
    """DenseGeneral (contracting trailing axes) that adds its LoRA update x A B when the
    ADAPTERS collection holds an adapter at this layer's path; otherwise exactly DenseGeneral.

    The adapter stays unmerged: x A [..., r] is a thin activation, and the frozen kernel W is
    never copied (W + A B would be a full-size weight and, under autodiff, a full-size
    gradient per adapted layer)."""

    def __call__(self, inputs: Array) -> Array:
        y = super().__call__(inputs)
        if not self.has_variable(ADAPTERS, "kernel"):
            return y
        adapter = self.get_variable(ADAPTERS, "kernel")
        axes = sorted(a % inputs.ndim for a in (
            self.axis if isinstance(self.axis, Sequence) else (self.axis,)))
        if axes != list(range(inputs.ndim - len(axes), inputs.ndim)):
            raise ValueError(f"a LoRA adapter at {'/'.join(self.path)} needs the layer to "
                             f"contract trailing axes, not {self.axis}")
        x = inputs.reshape(*inputs.shape[:inputs.ndim - len(axes)], -1)  # [..., in]: A's rows
        x, a, b = self.promote_dtype(x, adapter["a"], adapter["b"], dtype=self.dtype)
        delta = jnp.dot(jnp.dot(x, a, precision=self.precision), b, precision=self.precision)
        return y + delta.reshape(y.shape).astype(y.dtype)


def dense(
    features: int | Sequence[int],
    kernel_axes: Sequence[str | None],
    *,
    axis: int | Sequence[int] = -1,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
    kernel_init: Callable | None = None,
    kernel: str = "xla",
    **module_kw: Any,
) -> Dense:
    """A `Dense` (DenseGeneral, plus a LoRA adapter when one is given) whose kernel (and bias,
    on the output axes) carry logical names.

    `kernel` (a tower's `dense_kernel`): "xla" is lax.dot_general, autodiff's backward; "cpu"
    the 2-D matmul with a hand-written weight gradient that XLA:CPU runs faster (see
    `cpu_dense_dot_general`); "auto" left unresolved (a model built for no target) is "xla".
    `module_kw` goes to the module (e.g. parent=None for one applied to given weights)."""
    if kernel not in DENSE_KERNELS:
        raise ValueError(f"unknown dense_kernel {kernel!r}; expected one of {DENSE_KERNELS}")
    n_out = 1 if isinstance(features, int) else len(features)
    return Dense(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=param_init(kernel_init or nn.initializers.lecun_normal(), kernel_axes),
        bias_init=param_init(nn.initializers.zeros_init(), tuple(kernel_axes)[-n_out:]),
        precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None,
        dot_general=cpu_dense_dot_general if kernel == "cpu" else None,
        name=name,
        **module_kw,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: Array, w: Array, precision: Any = None) -> Array:
    return jnp.dot(x, w, precision=precision)


def _matmul_fwd(x, w, precision):
    return _matmul(x, w, precision), (x, w)


def _matmul_bwd(hi, res, g):
    x, w = res
    dx = jnp.dot(g, w.T, precision=hi)
    # XLA:CPU's dot kernels want the contracting dimension minor: left to itself, layout
    # assignment transposes the (larger) output gradient inside its producer fusion, which is
    # slow. Transpose the smaller operand explicitly instead; the barrier keeps it materialised.
    if x.size <= g.size:
        dw = jnp.dot(jax.lax.optimization_barrier(x.T), g, precision=hi)
    else:
        dw = jnp.dot(jax.lax.optimization_barrier(g.T), x, precision=hi).T
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


_FORWARD_MODE = contextvars.ContextVar("lvlm_forward_mode", default=False)


def forward_mode(*xs: Any) -> bool:
    """True while `jax.jvp` traces xs (or inside `forward_mode_scope(True)`).

    A custom VJP has no forward-mode rule, so the functions that have one (the CPU dense,
    "xla" attention, the chunked cross-entropy) switch to their autodiff reference there, with
    the same numbers; `jax.grad` linearizes instead and keeps the hand-written backward. Code
    that scan or remat traces into a jaxpr sees no JVP tracers, so the model sets the scope at
    its entry (VLM.__call__). Still unsupported, and refused by JAX ("can't apply
    forward-mode autodiff (jvp) to a custom_vjp function"): `jax.jvp` of an already-jitted
    function and forward-over-reverse (Hessian-vector products). For those, choose the plain
    paths by config: model.{vision,language}.dense_kernel="xla",
    model.{vision,language}.attention="xla_autodiff", train.loss_chunk=0.
    """
    return _FORWARD_MODE.get() or any(isinstance(x, ad.JVPTracer) for x in jax.tree.leaves(xs))


@contextlib.contextmanager
def forward_mode_scope(active: bool):
    """Everything traced inside takes the autodiff paths when `active` (see forward_mode)."""
    token = _FORWARD_MODE.set(_FORWARD_MODE.get() or bool(active))
    try:
        yield
    finally:
        _FORWARD_MODE.reset(token)


# The name scope of the CPU dense's ops: lowered programs show whether they contain it.
CPU_DENSE_SCOPE = "lvlm_cpu_dense"


def cpu_dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                          preferred_element_type=None):
    """DenseGeneral's contraction (trailing lhs axes with leading rhs axes) as one 2-D matmul
    with a CPU-friendly weight gradient; anything else goes to lax.dot_general."""
    (lc, rc), (lb, rb) = dimension_numbers
    n = len(lc)
    if (lb or rb or tuple(rc) != tuple(range(n))
            or tuple(lc) != tuple(range(lhs.ndim - n, lhs.ndim)) or lhs.dtype != rhs.dtype
            or forward_mode(lhs, rhs)):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    k = math.prod(lhs.shape[lhs.ndim - n:])
    with jax.named_scope(CPU_DENSE_SCOPE):
        out = _matmul(lhs.reshape(-1, k), rhs.reshape(k, -1), precision)
    return out.reshape(*lhs.shape[:lhs.ndim - n], *rhs.shape[n:])


class RMSNorm(nn.Module):
    """RMSNorm; `offset=1.0` gives Gemma's (1 + w) form with zero-initialised weights."""

    eps: float = 1e-6
    offset: float = 0.0
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros_init() if self.offset else nn.initializers.ones_init()
        w = self.param("scale", param_init(init, (self.axis_name,)), (x.shape[-1],),
                       self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            # Gemma multiplies in float32 and casts afterwards.
            return (y * (self.offset + w.astype(jnp.float32))).astype(self.dtype)
        # Llama casts to the input dtype before the weight multiply.
        return w.astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with logically named scale and bias."""

    eps: float = 1e-5
    axis_name: str = "vision_embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", param_init(nn.initializers.ones_init(), (self.axis_name,)),
                           (d,), self.param_dtype)
        bias = self.param("bias", param_init(nn.initializers.zeros_init(), (self.axis_name,)),
                          (d,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float) -> Array:
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding in the 'rotate half' layout used by HF Llama/Qwen2/Gemma checkpoints.

    x: [batch, len, heads, head_dim]; positions: [batch, len] integer positions.
    """
    inv_freq = rope_frequencies(x.shape[-1], theta)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


# Named rematerialization policies, as in MaxText: tags are set with checkpoint_name in the blocks.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no remat at all
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj",
                                                                   "value_proj"),
    "save_dot_except_mlp": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attn_out", "out_proj"),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names("out_proj"),
}


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; expected one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def maybe_remat(block_cls: type[nn.Module], policy_name: str, scanned: bool) -> type[nn.Module]:
    """Wraps a block class in nn.remat under a named policy ('none' leaves it alone)."""
    if policy_name == "none":
        return block_cls
    return nn.remat(block_cls, policy=remat_policy(policy_name), prevent_cse=not scanned)


_ACTIVATION_MESH = contextvars.ContextVar("lvlm_activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Any):
    """The mesh `constrain` places activations on while tracing inside (loop.mesh_context)."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def current_activation_mesh() -> Any:
    """The mesh of the enclosing `activation_mesh` (None outside one): what `constrain` and the
    shard_map of Pallas kernels (models/splash.py) place activations on."""
    return _ACTIVATION_MESH.get()


def constrain(x: Array, names: Sequence[str | None]) -> Array:
    """Logical sharding constraint on an activation, under `activation_mesh` and flax's logical
    axis rules; a no-op outside them.

    Not flax's with_logical_constraint: that applies only under jax.set_mesh (an abstract mesh),
    which would also constrain flax's scanned parameter slices, and is a silent no-op under the
    `with mesh:` context the loop traces in. Every activation constraint was dropped that way
    (bench/results/sharding_audit.md)."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or not nn.get_logical_axis_rules():
        return x
    spec = nn.logical_to_mesh_axes(tuple(names))
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
