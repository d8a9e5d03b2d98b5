"""The one decoder: a pure forward over stacked layers, with named sites to edit and capture.

Axes: B batch, T positions, D d_model, L layers, H query heads, K kv heads (H = K*G),
E head_dim, F d_mlp, V vocab, P logit positions.

Every family (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2, Qwen3, OLMo-2, Gemma, Gemma-2, Gemma-3) is
this one function with different `ModelConfig` fields; per-layer variation (local vs global
attention, per-layer RoPE base) is data scanned with the layer weights, so compile time does not
grow with depth.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxedit.errors import JaxeditError
from jaxedit.interventions import EMBED_SITE, SiteEdit, apply_edit, check_sites, validate_edits
from jaxedit.models.config import ModelConfig
from jaxedit.models.linear import project
from jaxedit.models.trained_rows import scan_layers, split_layers

Params = dict


class Context(NamedTuple):
    """Per-batch constants shared by all layers."""

    positions: jax.Array  # [B,T] int32 RoPE / learned positions
    allowed_global: jax.Array  # [B,T,T] bool: query t may attend key s
    allowed_local: jax.Array  # [B,T,T] bool: same, within the sliding window

    def rows(self, start: int) -> Context:
        """The context of query positions start..T-1 over all T keys (masks [B,T-start,T])."""
        return Context(self.positions[:, start:], self.allowed_global[:, start:], self.allowed_local[:, start:])


class LayerConstants(NamedTuple):
    """Per-layer data scanned with the weights."""

    inv_freq: jax.Array  # [L,E/2] float32
    is_local: jax.Array  # [L] bool


def layer_constants(cfg: ModelConfig) -> LayerConstants:
    half = cfg.head_dim // 2
    inv = cfg.rope_inv_freq() if cfg.uses_rope else jnp.zeros((cfg.n_layers, half))
    return LayerConstants(jnp.asarray(inv, jnp.float32), jnp.asarray(cfg.local_layers, bool))


def make_context(cfg: ModelConfig, attention_mask: jax.Array, positions: jax.Array | None = None) -> Context:
    """Causal (and sliding-window) attention permissions for a padded batch.

    attention_mask: [B,T], nonzero for real tokens (left or right padding). positions default to
    the count of real tokens before each one, so left-padded prompts get the same positions as
    unpadded ones.
    """
    real = attention_mask.astype(bool)
    if positions is None:
        positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
    t = real.shape[1]
    query, key = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    causal = (key <= query)[None] & real[:, None, :]
    window = cfg.sliding_window or t + 1
    local = causal & (key > query - window)[None]
    return Context(positions.astype(jnp.int32), causal, local)


def _wide(dtype) -> jnp.dtype:
    """float32, or wider if the input already is (float64 for finite-difference checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def _norm(cfg: ModelConfig, p: dict, x: jax.Array) -> jax.Array:
    """LayerNorm or RMSNorm over the last axis, statistics in float32 (as HF computes them)."""
    f32 = _wide(x.dtype)
    x32 = x.astype(f32)
    if cfg.norm == "layernorm":
        mean = x32.mean(-1, keepdims=True)
        var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
        return (normed * p["scale"].astype(f32) + p["bias"].astype(f32)).astype(x.dtype)
    normed = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + cfg.norm_eps)
    if cfg.norm_offset:
        return (normed * (cfg.norm_offset + p["scale"].astype(f32))).astype(x.dtype)
    return p["scale"] * normed.astype(x.dtype)


def _activation(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    if cfg.activation == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if cfg.activation == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if cfg.activation == "silu":
        return jax.nn.silu(x)
    return jax.nn.relu(x)


def _rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate [B,T,N,E] by positions [B,T] (HF's rotate-half layout).

    inv_freq [R/2]: only the first R features turn (GPT-NeoX's partial rotary), the rest pass.
    """
    freqs = positions[..., None].astype(_wide(x.dtype)) * inv_freq  # [B,T,R/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    turned, passed = x[..., :angles.shape[-1]], x[..., angles.shape[-1]:]
    first, second = jnp.split(turned, 2, axis=-1)
    return jnp.concatenate([turned * cos + jnp.concatenate([-second, first], axis=-1) * sin, passed], axis=-1)


class Sites:
    """Applies this layer's edits and records captures, site by site; taps layer matrices (`trained_rows`).

    taps: {matrix name: tap [..., out…] added to that matrix's output, or None to record without adding}.
    `inputs` collects each tapped matrix's input (and its output where the tap is None).
    """

    def __init__(self, edits: dict[str, SiteEdit], capture: tuple[str, ...], taps: dict | None = None):
        self.edits, self.capture, self.captured = edits, capture, {}
        self.taps, self.inputs = taps or {}, {}

    def __call__(self, name: str, act: jax.Array) -> jax.Array:
        act = apply_edit(act, self.edits.get(name))
        if name in self.capture:
            self.captured[name] = act
        return act

    def tap(self, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
        """y = x·W of layer matrix `name`, plus its tap if it has one (x recorded in `inputs`)."""
        if name not in self.taps:
            return y
        tap = self.taps[name]
        self.inputs[name] = (x, y) if tap is None else x
        return y if tap is None else y + tap.astype(y.dtype)


class KeysValues(NamedTuple):
    """Keys and values of earlier positions as attention reads them (after q/k norms and RoPE)."""

    k: jax.Array  # [B,S,K,E]
    v: jax.Array  # [B,S,K,E]


def _side(p: dict, name: str, x: jax.Array, site: Sites) -> jax.Array:
    """y = x·W of matrix W = p[name] (`linear.project`) plus the LoRA side path (x·A)·B of adapter
    p['lora'][name] if there is one (`lora.side_params`): x [B,T,in axes], A [in,r] (scale folded in),
    B [r,out]; the merged weight W + A·B is never formed. Then the matrix's tap, if `site` has one (`Sites.tap`)."""
    y = project(x, p[name])
    adapter = p.get("lora", {}).get(name)
    if adapter is not None:
        flat = x.reshape(x.shape[:2] + (-1,))
        low = (flat @ adapter["a"].astype(x.dtype)) @ adapter["b"].astype(x.dtype)
        y = y + low.reshape(y.shape).astype(y.dtype)
    return site.tap(name, x, y)


def _qkv(cfg: ModelConfig, p: dict, x: jax.Array, positions: jax.Array, inv_freq, site: Sites):
    """Queries [B,T,H,E], keys and values [B,T,K,E] of normalized input x [B,T,D] at `positions`."""
    q = _side(p, "wq", x, site)
    k = _side(p, "wk", x, site)
    v = _side(p, "wv", x, site)
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q, k, v = site("attn_q", q), site("attn_k", k), site("attn_v", v)
    if cfg.qk_norm:
        q, k = _qk_norm(cfg, p["q_norm"], q), _qk_norm(cfg, p["k_norm"], k)
    if cfg.uses_rope:
        q, k = _rope(q, positions, inv_freq), _rope(k, positions, inv_freq)
    return q, k, v


def _qk_norm(cfg: ModelConfig, scale: jax.Array, x: jax.Array) -> jax.Array:
    """RMSNorm of queries or keys [B,T,N,E]: over each head's E (scale [E]) or over all N*E (scale [N,E])."""
    if cfg.qk_norm == "per_head":
        return _norm(cfg, {"scale": scale}, x)
    return _norm(cfg, {"scale": scale.reshape(-1)}, x.reshape(x.shape[:2] + (-1,))).reshape(x.shape)


def _pre_norm(cfg: ModelConfig, p: dict, x: jax.Array) -> jax.Array:
    """The norm in front of attention or the MLP; the residual itself where there is none (OLMo-2)."""
    return _norm(cfg, p, x) if cfg.pre_norms else x


def keys_values(cfg: ModelConfig, lp: dict, x: jax.Array, positions: jax.Array, inv_freq,
                site: Sites | None = None) -> KeysValues:
    """One layer's keys and values [B,T,K,E] of residual x [B,T,D] (`resid_pre`), unedited (site: for its taps)."""
    _, k, v = _qkv(cfg, lp["attn"], _pre_norm(cfg, lp.get("attn_norm"), x), positions, inv_freq,
                   site or Sites({}, ()))
    return KeysValues(k, v)


def attention(cfg: ModelConfig, p: dict, x: jax.Array, ctx: Context, inv_freq, is_local, site: Sites,
              prefix: KeysValues | None = None, rows: jax.Array | None = None, at=None) -> jax.Array:
    """Grouped-query attention of normalized input x [B,T,D]; returns z [B,T,H,E].

    prefix: keys and values of S earlier positions that x's rows also attend to; then x holds
    positions S..S+T-1 and ctx's masks are [B,T,S+T] (`Context.rows`). at: instead, x's keys and
    values overwrite prefix rows at..at+T-1 (a decode cache of S slots; masks [B,T,S]). rows: [B,Q]
    the only query rows wanted (keys and values still come from every row); z is then [B,Q,H,E].
    """
    q, k, v = _qkv(cfg, p, x, ctx.positions, inv_freq, site)
    allowed = jnp.where(is_local, ctx.allowed_local, ctx.allowed_global)
    if rows is not None:
        q = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)
        allowed = jnp.take_along_axis(allowed, rows[:, :, None], axis=1)
    if prefix is not None and at is not None:
        k = jax.lax.dynamic_update_slice_in_dim(prefix.k, k.astype(prefix.k.dtype), at, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(prefix.v, v.astype(prefix.v.dtype), at, axis=1)
    elif prefix is not None:
        k = jnp.concatenate([prefix.k.astype(k.dtype), k], axis=1)
        v = jnp.concatenate([prefix.v.astype(v.dtype), v], axis=1)
    b, t = q.shape[:2]
    n_kv, e = k.shape[2:]
    groups = cfg.n_heads // n_kv
    q = q.reshape(b, t, n_kv, groups, e)
    scores = jnp.einsum("btkge,bske->bkgts", q, k) * jnp.asarray(cfg.query_scale, q.dtype)
    if cfg.attn_softcap:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    f32 = _wide(scores.dtype)
    scores = jnp.where(allowed[:, None, None], scores.astype(f32), jnp.finfo(f32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    z = jnp.einsum("bkgts,bske->btkge", weights, v).reshape(b, t, cfg.n_heads, e)
    return site("attn_z", z)


def _mlp(cfg: ModelConfig, p: dict, x: jax.Array, site: Sites) -> jax.Array:
    """MLP of normalized input x [B,T,D] -> [B,T,D]."""
    up = _side(p, "w_up", x, site)
    if cfg.mlp_bias:
        up = up + p["b_up"]
    if cfg.gated_mlp:
        gate = _side(p, "w_gate", x, site)
        if cfg.mlp_bias:
            gate = gate + p["b_gate"]
        hidden = _activation(cfg, gate) * up
    else:
        hidden = _activation(cfg, up)
    hidden = site("mlp_hidden", hidden)
    out = _side(p, "w_down", hidden, site)
    return out + p["b_down"] if cfg.mlp_bias else out


def block(cfg: ModelConfig, lp: dict, x: jax.Array, ctx: Context, inv_freq, is_local, site: Sites,
          prefix: KeysValues | None = None, rows: jax.Array | None = None, at=None) -> jax.Array:
    """One decoder layer on residual x [B,T,D], with one layer's params `lp` (no L axis).

    prefix, at: this layer's keys and values of other positions (see `attention`). rows: [B,Q] the
    only rows whose output is wanted: the layer returns [B,Q,D] (sites after attention see Q rows).
    With a parallel residual (GPT-NeoX) the MLP reads resid_pre; resid_mid = resid_pre + attn_out is
    still the partial sum that resid_post = resid_mid + mlp_out adds to.
    """
    x = site("resid_pre", x)
    h = site("attn_in", _pre_norm(cfg, lp.get("attn_norm"), x))
    z = attention(cfg, lp["attn"], h, ctx, inv_freq, is_local, site, prefix, rows, at)
    if rows is not None:
        x = jnp.take_along_axis(x, rows[..., None], axis=1)
    attn_out = _side(lp["attn"], "wo", z, site)
    if cfg.out_bias:
        attn_out = attn_out + lp["attn"]["bo"]
    if cfg.post_norms:
        attn_out = _norm(cfg, lp["attn_post_norm"], attn_out)
    resid_pre = x
    x = site("resid_mid", x + site("attn_out", attn_out))
    h = site("mlp_in", _pre_norm(cfg, lp.get("mlp_norm"), resid_pre if cfg.parallel_residual else x))
    mlp_out = _mlp(cfg, lp["mlp"], h, site)
    if cfg.post_norms:
        mlp_out = _norm(cfg, lp["mlp_post_norm"], mlp_out)
    return site("resid_post", x + site("mlp_out", mlp_out))


def embed(cfg: ModelConfig, params: Params, tokens: jax.Array, ctx: Context, hook=None) -> jax.Array:
    """Token (+ learned position) embeddings [B,T,D], with Gemma's sqrt(D) scale.

    hook: a function [B,T,D] -> [B,T,D] of the raw table rows, applied before the scale and
    positions (where a hook on HF's `embed_tokens` acts; the soft-prompt attacks).
    """
    table = params["embed"]["tokens"]
    x = jnp.take(table, tokens, axis=0)
    if hook is not None:
        x = hook(x)
    if cfg.embed_scale != 1.0:
        x = x * jnp.asarray(cfg.embed_scale, table.dtype)
    if cfg.learned_positions:
        x = x + jnp.take(params["embed"]["positions"], ctx.positions, axis=0)
    return x


def run_layers(
    cfg: ModelConfig,
    layers: dict,
    consts: LayerConstants,
    x: jax.Array,
    ctx: Context,
    edits: dict[str, SiteEdit],
    capture: tuple[str, ...],
    remat: bool = False,
    frozen_below: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scan layers (params with a leading L' axis) over residual x [B,T,D].

    Returns the final residual and captures {site: [L',B,T,...]}. Works on any contiguous slice of
    layers (pass the matching slices of `consts` and `edits`). frozen_below (a static int; no edits
    or captures with it): the first frozen_below layers run as their own scan under stop_gradient,
    so a backward pass stops at layer frozen_below instead of running through the frozen layers
    below it (the same values; the gradients of those layers and of x are zero).
    """
    layer_capture = tuple(s for s in capture if s != EMBED_SITE)
    layer_edits = {k: v for k, v in edits.items() if k != EMBED_SITE}
    if frozen_below:
        if layer_edits or layer_capture:
            raise JaxeditError("run_layers(frozen_below=...) is for training graphs: pass no edits or captures with it")
        below, above = split_layers(layers, frozen_below)
        consts_below, consts_above = split_layers(consts, frozen_below)
        x, _ = run_layers(cfg, *jax.lax.stop_gradient((below, consts_below, x)), ctx, {}, (), remat)
        return run_layers(cfg, above, consts_above, jax.lax.stop_gradient(x), ctx, {}, (), remat)

    def body(x, lp, scanned, ctx, taps):
        inv_freq, is_local, layer_edits = scanned
        site = Sites(layer_edits, layer_capture, taps("x"))
        x = block(cfg, lp, x, ctx, inv_freq, is_local, site)
        return x, site.captured, {"x": site.inputs}

    return scan_layers(body, x, layers, (consts.inv_freq, consts.is_local, layer_edits), ctx, remat)


def run_from(
    cfg: ModelConfig,
    params: Params,
    x: jax.Array,
    ctx: Context,
    start: int | jax.Array,
    edits: dict[str, SiteEdit] | None = None,
    prefix: KeysValues | None = None,
    rows: jax.Array | None = None,
) -> jax.Array:
    """Final residual [B,T,D] from x = resid_pre of layer `start`, running only layers start..L-1.

    `start` may be traced: a sweep reuses the unpatched prefix and pays only for the suffix. Under
    `vmap` with a batched `start` the loop runs to the longest suffix, so map over layers
    sequentially (`lax.map`) and vmap over sites within a layer. Not reverse-differentiable in
    `start`-traced form (a while loop); use `run_layers` for gradients. edits: per-layer sites
    with a leading L axis, as in `forward` (validated there). prefix: keys and values [L,B,S,K,E]
    of S unchanged earlier positions; x then holds only the later rows (ctx from `Context.rows`).
    rows: [B,Q] the only rows read afterwards (the last position): the last layer computes queries,
    attention output and MLP for them alone and the result is [B,Q,D] (needs no edits).
    """
    consts = layer_constants(cfg)
    edits = {k: v for k, v in validate_edits(edits, cfg.n_layers).items() if k != EMBED_SITE}
    if rows is not None and edits:
        raise JaxeditError("run_from(rows=...) computes only some rows of the last layer: pass no edits with it")

    def body(i, x):
        take = lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)  # noqa: E731
        lp, layer_edits, layer_prefix = jax.tree.map(take, (params["layers"], edits, prefix))
        return block(cfg, lp, x, ctx, consts.inv_freq[i], consts.is_local[i], Sites(layer_edits, ()), layer_prefix)

    if rows is None:
        return jax.lax.fori_loop(start, cfg.n_layers, body, x)
    x = jax.lax.fori_loop(start, cfg.n_layers - 1, body, x)

    def last_layer(x):
        lp, last_prefix = jax.tree.map(lambda a: a[-1], (params["layers"], prefix))
        return block(cfg, lp, x, ctx, consts.inv_freq[-1], consts.is_local[-1], Sites({}, ()), last_prefix, rows)

    def already_final(x):
        return jnp.take_along_axis(x, rows[..., None], axis=1)

    return jax.lax.cond(start < cfg.n_layers, last_layer, already_final, x)


def unembed_norm(cfg: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    """The final norm of residual [..., D] (HF's last `hidden_states` entry)."""
    return _norm(cfg, params["final_norm"], x)


def unembed(cfg: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    """Final norm and logits [..., V] from residual [..., D] (with Gemma-2/3's final soft-cap)."""
    x = unembed_norm(cfg, params, x)
    if cfg.tie_embeddings:
        logits = jnp.einsum("...d,vd->...v", x, params["embed"]["tokens"])
    else:
        logits = x @ params["unembed"]["w"]
    return _final_softcap(cfg, logits)


def unembed_columns(cfg: ModelConfig, params: Params, x: jax.Array, ids: jax.Array) -> jax.Array:
    """The logits [B,N] of residual x [B,D] at token ids [B,N] only: `unembed(x)` at those ids, at N/V the cost."""
    x = unembed_norm(cfg, params, x)
    if cfg.tie_embeddings:
        logits = jnp.einsum("bd,bnd->bn", x, jnp.take(params["embed"]["tokens"], ids, axis=0))
    else:
        logits = jnp.einsum("bd,dbn->bn", x, jnp.take(params["unembed"]["w"], ids, axis=1))
    return _final_softcap(cfg, logits)


def _final_softcap(cfg: ModelConfig, logits: jax.Array) -> jax.Array:
    if cfg.final_softcap:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits


def forward(
    params: Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    logit_positions: jax.Array | None = None,
    edits: dict[str, SiteEdit] | None = None,
    capture: tuple[str, ...] = (),
    remat: bool = False,
    embed_hook=None,
    frozen_below: int = 0,
    unembedded: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits and captured activations of a (padded) batch.

    tokens: [B,T] int. attention_mask: [B,T] (default all ones). logit_positions: [B,P] int
    indices to unembed (default: all T positions). edits: {site: SiteEdit}; capture: site names.
    embed_hook: a function of the raw embedding rows (see `embed`). frozen_below: see `run_layers`.
    Returns (logits [B,P,V] or [B,T,V], {site: [L,B,T,...] or [B,T,D] for `embed`}); with
    unembedded=False the final residual [B,P,D] or [B,T,D] in place of the logits (`unembed` of it).
    """
    check_sites(capture, "capture")
    edits = validate_edits(edits, cfg.n_layers)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    ctx = make_context(cfg, attention_mask, positions)
    x = apply_edit(embed(cfg, params, tokens, ctx, embed_hook), edits.get(EMBED_SITE))
    cache = {EMBED_SITE: x} if EMBED_SITE in capture else {}
    x, captured = run_layers(cfg, params["layers"], layer_constants(cfg), x, ctx, edits, tuple(capture), remat,
                             frozen_below)
    cache.update(captured)
    if logit_positions is not None:
        x = jnp.take_along_axis(x, logit_positions[..., None], axis=1)
    return (unembed(cfg, params, x) if unembedded else x), cache


def forward_shared_prefix(
    params: Params,
    cfg: ModelConfig,
    prefix: jax.Array,
    tokens: jax.Array,
    attention_mask: jax.Array,
    logit_positions: jax.Array,
    remat: bool = False,
    frozen_below: int = 0,
    unembedded: bool = True,
) -> jax.Array:
    """Logits [B,P,V] of the rows prefix + tokens[b], unembedded at logit_positions [B,P] (indices into tokens);
    with unembedded=False the final residual [B,P,D] there instead.

    prefix [S]: token ids every row starts with (a prompt template's shared head); its layers run
    once for the batch and every row attends to its keys and values, so a layer costs S + B·T
    positions instead of B·(S+T). tokens/mask [B,T]: the rest of each row, right-padded. Equals
    `forward` on the concatenated rows. frozen_below: as in `run_layers`.
    """
    b, s = tokens.shape[0], prefix.shape[0]
    whole = jnp.concatenate([jnp.ones((b, s), attention_mask.dtype), attention_mask], axis=1)
    ctx = make_context(cfg, whole).rows(s)  # rows' queries over prefix + row keys
    prefix_ctx = make_context(cfg, jnp.ones((1, s), jnp.int32))
    carry = (embed(cfg, params, prefix[None], prefix_ctx), embed(cfg, params, tokens, ctx))

    def body(carry, lp, scanned, contexts, taps):
        (head, x), (inv_freq, is_local), (ctx, prefix_ctx) = carry, scanned, contexts
        sites = {label: Sites({}, (), taps(label)) for label in ("kv", "rows", "head")}
        kv = keys_values(cfg, lp, head, prefix_ctx.positions, inv_freq, sites["kv"])
        kv = KeysValues(*(jnp.broadcast_to(a, (b, *a.shape[1:])) for a in kv))
        x = block(cfg, lp, x, ctx, inv_freq, is_local, sites["rows"], prefix=kv)
        head = block(cfg, lp, head, prefix_ctx, inv_freq, is_local, sites["head"])
        return (head, x), None, {label: site.inputs for label, site in sites.items()}

    consts = layer_constants(cfg)
    layers, scanned = params["layers"], (consts.inv_freq, consts.is_local)
    if frozen_below:
        below, layers = split_layers(layers, frozen_below)
        scanned_below, scanned = split_layers(scanned, frozen_below)
        carry, _ = scan_layers(body, *jax.lax.stop_gradient((carry, below, scanned_below)), (ctx, prefix_ctx), remat)
        carry = jax.lax.stop_gradient(carry)
    (_, x), _ = scan_layers(body, carry, layers, scanned, (ctx, prefix_ctx), remat)
    x = jnp.take_along_axis(x, logit_positions[..., None], axis=1)
    return unembed(cfg, params, x) if unembedded else x


def last_positions(attention_mask: jax.Array) -> jax.Array:
    """Index [B,1] of the last real token of each row (right or left padding)."""
    t = attention_mask.shape[1]
    idx = jnp.where(attention_mask.astype(bool), jnp.arange(t)[None], -1)
    return idx.max(axis=1, keepdims=True)
