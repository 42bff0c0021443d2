"""Scaled dot-product attention with grouped-query heads and backend dispatch.

Backends:
- `xla`: einsums with named axes; runs everywhere (the CPU path and the one tests run).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (fused flash attention on GPU);
  needs bf16/fp16 inputs, so fp32 calls fall back to `xla`.
- `splash`: the Pallas splash-attention kernel on TPU, for self-attention without a cache
  (training and prefill); segment ids carry padding and packing.
`auto` picks `cudnn` on GPU, `splash` on TPU and `xla` otherwise, by the platform of the devices
the computation is compiled for (the active mesh's; the host's default backend without one), so an
AOT compile for TPU devices from a CPU host picks splash. Softmax is always in float32.

Splash is a Pallas (Mosaic) kernel, which XLA cannot partition: on a mesh it runs under
`shard_map`, one call per device on its batch rows (`data` x `fsdp`) and heads (`tensor`), as the
activation rules shard them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxreason import sharding

from jaxreason.ops import masks

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """`auto` -> the backend for `platform` (default: the target devices', `sharding.target_platform`)."""
  if backend != "auto":
    return backend
  platform = platform or sharding.target_platform()
  return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform, "xla")


def xla_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray,
                  scale: float) -> jnp.ndarray:
  """q [B, T, N, H], k/v [B, S, K, H], mask bool [B, T, S] -> [B, T, N, H].

  Decoding (T == 1) groups query heads per KV head, so the cache is read once; longer queries
  (training, prefill) repeat K/V per query head, whose 4-D einsums run ~25% faster on XLA:CPU.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  g = n // kv_heads
  if t > 1:
    if g > 1:
      k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    # [B, N, T, S]
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, :, :], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("BNTS,BSNH->BTNH", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
  # [B, T, K, G, H]
  q = q.reshape(b, t, kv_heads, g, h)
  # [B, K, G, T, S]
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, None, None, :, :], logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  # [B, T, K, G, H]
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


def xla_cached_attention(q: jnp.ndarray, kt: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray,
                         scale: float) -> jnp.ndarray:
  """`xla_attention` over the KV cache's layout: q [B, T, N, H], kt [B, K, H, S] (keys transposed),
  v [B, K, S, H], mask [B, T, S].

  The dots batch over (B, K) and read K^T and V as plain [H, S] / [S, H] matrices, so XLA:CPU runs
  them without transposing the cache; a decode step (T == 1) drops the T axis (4-D dots). About 2x
  faster decode attention at 128-512 slots than the 5-D form over [B, S, K, H]. Longer queries
  (prefill) run `xla_attention` on the transposed bucket.
  """
  b, t, n, h = q.shape
  kv_heads = v.shape[1]
  g = n // kv_heads
  if t == 1:
    # [B, K, G, H] x [B, K, H, S] -> [B, K, G, S]
    logits = jnp.einsum("BKGH,BKHS->BKGS", q.reshape(b, kv_heads, g, h), kt,
                        preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, :, None, :], logits, _NEG_INF)  # mask [B, 1, S] -> [B, 1, 1, S]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGS,BKSH->BKGH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, 1, n, h).astype(q.dtype)
  # Longer queries (prefill) take `xla_attention`'s path over [B, S, K, H]: the transposed copy is
  # paid once per prefill, and XLA:CPU has no bf16 x bf16 -> f32 kernel for the 5-D dots over K^T.
  return xla_attention(q, *_bskh(kt, v), mask, scale)


def _bskh(kt, v):
  """The cache's kt [B, K, H, S] and v [B, K, S, H] as [B, S, K, H] each (a transposed copy)."""
  return jnp.transpose(kt, (0, 3, 1, 2)), jnp.swapaxes(v, 1, 2)


def cudnn_attention(q, k, v, mask, scale, implementation="cudnn"):
  """`jax.nn.dot_product_attention` (GQA-aware); `implementation="xla"` runs the same call on CPU."""
  if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    return xla_attention(q, k, v, mask, scale)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], scale=scale,
                                     implementation=implementation)
  return out.astype(q.dtype)


@functools.cache
def _splash_kernel(num_heads: int, seq_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len)) for _ in range(num_heads)])
  return sk.make_splash_mqa_single_device(mask, interpret=interpret), sk


def _splash_local(q, k, v, q_segments, kv_segments, scale, interpret):
  """Splash on one device's block: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H]."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  kernel, sk = _splash_kernel(n // kv_heads, t, interpret)
  # [B, K, G, T, H] for the MQA kernel, one call per kv head.
  qg = (q * scale).reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
  kk = k.transpose(0, 2, 1, 3)
  vv = v.transpose(0, 2, 1, 3)
  seg = sk.SegmentIds(q=q_segments, kv=kv_segments)
  per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads
  out = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(qg, kk, vv, seg)  # over batch
  # [B, K, G, T, H] -> [B, T, N, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def splash_attention(q, k, v, q_segments, kv_segments, scale, *, platform: str | None = None):
  """Splash attention; causal by index, segments for padding and packing (no cache).

  Inside `sharding.use_mesh` the kernel runs under `shard_map` with the batch split as the rules
  split `act_batch` and the heads as `act_heads`; when the KV heads cannot follow the query heads'
  split (e.g. 2 KV heads on tensor=4) K/V are repeated to one head per query head first.
  Off TPU devices the kernel runs in Pallas interpret mode (slow; the tests use it).
  """
  platform = platform or sharding.target_platform()
  interpret = platform != "tpu"
  active = sharding.active_mesh()
  if active is None:
    return _splash_local(q, k, v, q_segments, kv_segments, scale, interpret)
  mesh, rules = active
  q_spec = sharding.logical_to_spec(("act_batch", None, "act_heads", None), rules, mesh, q.shape)
  k_spec = sharding.logical_to_spec(("act_batch", None, "act_kv_heads", None), rules, mesh, k.shape)
  if q_spec[2] != k_spec[2]:
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    k_spec = q_spec
  seg_spec = P(q_spec[0], None)
  fn = functools.partial(_splash_local, scale=scale, interpret=interpret)
  return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, seg_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, q_segments, kv_segments)


def attention(q, k, v, *, mask, scale, backend="xla", q_segments=None, kv_segments=None,
              self_attention=False):
  """Dispatches to a backend. `mask` is the full bool mask [B, T, S] (used by xla/cudnn)."""
  backend = resolve_backend(backend)
  if backend == "splash" and self_attention and q.shape[1] % 128 == 0:
    return splash_attention(q, k, v, q_segments, kv_segments, scale)
  if backend == "cudnn":
    return cudnn_attention(q, k, v, mask, scale)
  return xla_attention(q, k, v, mask, scale)


# Bucketed decode attention (below), on by default. It was off: the switch took the layer's cache
# `ck[layer]` as its operand, which XLA materialises (a copy of the layer's whole cache per step), and
# the benchmark timed both modes with one cached trace. With the stacked cache as the operand and the
# slice inside each branch, XLA:CPU decode at context 128 of a 4,224-slot cache ran ~7x faster than
# attention over the whole cache (tools/bench_rollout.py). False: one branch, the whole cache.
BUCKETED_DECODE = True
DECODE_BLOCK = 128  # the smallest bucket (read at trace time, like BUCKETED_DECODE)


def kv_buckets(cache_len: int, block: int | None = None) -> tuple[int, ...]:
  """Static key lengths decode attention may run at: block (default DECODE_BLOCK), 2 block, 4 block,
  ... < cache_len, cache_len."""
  sizes, b = [], DECODE_BLOCK if block is None else block
  while b < cache_len:
    sizes.append(b)
    b *= 2
  return tuple(sizes) + (cache_len,)


def cached_attention(q, ck, cv, layer: int, q_positions, q_segments, kv_positions, kv_segments, live, *, scale,
                     backend="xla", block: int | None = None, bucketed: bool | None = None):
  """Attention of q [B, T, N, H] over the first `live` slots of layer `layer` of the cache `ck`
  [L, B, K, H, S] (keys transposed), `cv` [L, B, K, S, H] (`KVCache`'s layout).

  `live` (a traced scalar: the longest live row's filled length) picks the smallest bucket of
  `kv_buckets(S)` that holds it, so a step at context 200 reads 256 slots, not S. Slots past `live`
  are empty (segment 0) for every row, so the result equals attention over the whole cache. The
  slicing happens inside the chosen branch, so only the bucket is read. `bucketed` (default `BUCKETED_DECODE`,
  True) False: one branch, the whole cache.
  """
  bucketed = BUCKETED_DECODE if bucketed is None else bucketed
  block = DECODE_BLOCK if block is None else block
  buckets = kv_buckets(cv.shape[3], block) if bucketed else (cv.shape[3],)
  dt = q.dtype
  backend = resolve_backend(backend)

  def at(size):
    def branch(q, ck, cv, kv_positions, kv_segments):
      # kt [B, K, H, size], v [B, K, size, H]: layer `layer`, slots [0, size), read straight from
      # the stacked cache
      b, kh, h = cv.shape[1], cv.shape[2], cv.shape[4]
      start = (layer, 0, 0, 0, 0)
      kt = jax.lax.dynamic_slice(ck, start, (1, b, kh, h, size))[0].astype(dt)
      v = jax.lax.dynamic_slice(cv, start, (1, b, kh, size, h))[0].astype(dt)
      mask = masks.attention_mask(q_positions, q_segments, kv_positions[:, :size], kv_segments[:, :size])
      if backend == "cudnn":  # [B, S, K, H] for jax.nn.dot_product_attention
        return cudnn_attention(q, *_bskh(kt, v), mask, scale)
      return xla_cached_attention(q, kt, v, mask, scale)
    return branch

  # The whole stacked cache goes into the switch (not `ck[layer]`, which would be materialised as
  # the branch operand: a copy of the layer's cache every step); each branch slices what it reads.
  operands = (q, ck, cv, kv_positions, kv_segments)
  if len(buckets) == 1:
    return at(buckets[0])(*operands)
  index = jnp.sum(jnp.asarray(buckets[:-1]) < live).astype(jnp.int32)
  return jax.lax.switch(index, [at(size) for size in buckets], *operands)
