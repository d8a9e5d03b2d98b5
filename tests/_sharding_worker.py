"""Subprocess side of tests/test_sharding.py: sharded runs on 8 fake CPU devices or in 2 jax.distributed processes.

    python tests/_sharding_worker.py devices OUT_DIR GEMMA3_DIR LLAMA_DIR   (XLA_FLAGS: 8 host devices)
    python tests/_sharding_worker.py processes OUT_DIR LLAMA_DIR            (JAX_* env of a 2-process run)

Results go to OUT_DIR as .npz; the test compares them with single-device runs of the plain library.
The input builders below are shared with the test so both sides see the same data.
"""

import sys
from pathlib import Path

import numpy as np

TRAIN_STEPS = 3
GEMMA2_9B = dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                 num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                 sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                 query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                 rms_norm_eps=1e-6, rope_theta=10000.0)


def prompts(b=8, t=7, vocab=96, seed=0):
    """Right-padded tokens [B,T], mask [B,T], aligned corrupt tokens [B,T], answer ids [B], other ids [B,2]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    tokens = np.where(mask, rng.integers(3, vocab, (b, t)), 0).astype(np.int32)
    corrupt = np.where(mask, (tokens * 7 + 3) % (vocab - 3) + 3, 0).astype(np.int32)
    answer, others = rng.integers(3, vocab, b).astype(np.int32), rng.integers(3, vocab, (b, 2)).astype(np.int32)
    return tokens, mask, corrupt, answer, others


def train_batch(b=4, t=6, vocab=96, seed=1):
    """A forget batch (injection CE to random targets): {'forget': {'tokens', 'mask', 'target'}}."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(t)[None] < rng.integers(3, t + 1, b)[:, None]).astype(np.int32)
    tokens = np.where(mask, rng.integers(3, vocab, (b, t)), 0).astype(np.int32)
    return {"forget": {"tokens": tokens, "mask": mask, "target": rng.integers(3, vocab, b).astype(np.int32)}}


def train_setup(cfg):
    """(mask, optimizer, loss weights): head 1.0 (+ its kv head), MLP of layer 2, wv of layer 0."""
    from jaxedit.edit.optim import AdamWSpec
    from jaxedit.edit.train import LossWeights
    from jaxedit.localize import components as C

    mask = C.trainable_mask(C.Components.make(["head", "mlp", "wv"], [1, 2, 0], [0, -1, -1]), cfg)
    return mask, AdamWSpec(weight_decay=0.1), LossWeights(forget=1.0)


def run_train(params, cfg, batch, mesh=None):
    """TRAIN_STEPS masked train steps, on one device or with everything sharded over `mesh`.

    -> (trainable leaves after, losses [TRAIN_STEPS], shape of Adam's mu for w_up on one device).
    """
    import jax
    import jax.numpy as jnp

    from jaxedit.edit.optim import split_trainable, trainable_part
    from jaxedit.edit.train import train_step
    from jaxedit.sharding import like, opt_state_shardings, param_shardings, shard_batch, shard_params

    mask, opt, weights = train_setup(cfg)
    trainable, frozen = split_trainable(params, mask)
    init = lambda t: (jax.tree.map(jnp.copy, t), opt.init(t))  # noqa: E731  (train_step donates both)
    out_shardings = None
    if mesh is not None:
        shardings = like(trainable, param_shardings(cfg, mesh))
        state = jax.eval_shape(opt.init, trainable)
        out_shardings = (shardings, opt_state_shardings(opt(trainable_part(mask), 1e-2), state, shardings))
        frozen, batch = shard_params(frozen, param_shardings(cfg, mesh)), shard_batch(mesh, batch)
    trainable, state = jax.jit(init, out_shardings=out_shardings)(trainable)
    adam = state[2][0]  # masked_adamw's state: (mask, clip, (adam, decay, lr), mask)
    mu_shard = adam.mu["layers"]["mlp"]["w_up"].addressable_shards[0].data.shape
    losses = []
    for _ in range(TRAIN_STEPS):
        trainable, state, metrics = train_step(trainable, frozen, state, batch, cfg, weights, opt,
                                               trainable_part(mask), 1e-2)
        losses.append(float(metrics["loss"]))
    return trainable, np.array(losses), mu_shard


def hand_made_parts():
    """[5,2] units for the gathering check: unit i is (10·i, 10·i + 1)."""
    return np.stack([10 * np.arange(5), 10 * np.arange(5) + 1], axis=1)


def data_parallel_inputs():
    """The data-parallel check's inputs: a train batch, text windows [8,7] and patching prompts of 8 rows."""
    tokens, mask, corrupt, answer, others = prompts()
    return train_batch(b=8), (tokens, mask), (tokens, corrupt, mask, answer, others)


def run_data_parallel(model):
    """The hot paths on `model` as placed (one device, or params on a mesh): TRAIN_STEPS masked train
    steps, general-text metrics, residuals at the last token, a patching sweep. -> flat {name: array}."""
    from jaxedit import readout
    from jaxedit.eval.side_effects import general_text_metrics
    from jaxedit.localize import activation_patching
    from jaxedit.localize.metrics import logit_diff

    batch, (tokens, mask), (clean, corrupt, sweep_mask, answer, others) = data_parallel_inputs()
    trainable, losses, _ = run_train(model.params, model.cfg, batch)
    text = general_text_metrics(model, tokens, mask, reference_params=model.params, batch_size=8)
    resid = readout.resid_at(model.cfg, model.params, tokens, mask, mask.sum(1) - 1, batch_size=8)
    sweep = activation_patching.patching_sweep(model.params, model.cfg, clean, corrupt, sweep_mask, metric=logit_diff,
                                               metric_args=(answer, others), site="resid_pre")
    return {"losses": losses, "text": np.array([text["ce"], text["accuracy"], text["kl"]]), "resid": resid,
            "sweep": sweep.per_example} | _flat("trainable/", trainable)


def _spy_batch_shards(seen: dict) -> None:
    """Record the per-device shape of the first batch array each hot path's jitted program receives."""
    import jax

    from jaxedit import readout
    from jaxedit.edit import train
    from jaxedit.eval import side_effects
    from jaxedit.localize import activation_patching

    def spy(module, name, pick):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            x = pick(args)
            shard = x.sharding.shard_shape(x.shape) if isinstance(x, jax.Array) else x.shape  # numpy: not placed
            seen.setdefault(name, (x.shape, shard))
            return original(*args, **kwargs)
        setattr(module, name, wrapped)

    spy(train, "_train_step", lambda a: a[3]["forget"]["tokens"])
    spy(side_effects, "_text_sums", lambda a: a[2])
    spy(readout, "read_jit", lambda a: a[2])
    spy(activation_patching, "_sweep", lambda a: a[1])


def _flat(prefix, tree):
    import jax

    return {prefix + jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def devices(out: Path, gemma3_dir, llama_dir):
    import dataclasses

    import jax

    import jaxedit
    from jaxedit.localize.metrics import logit_diff
    from jaxedit.models.config import config_from_hf
    from jaxedit.sharding import MeshSpec, make_mesh, param_shardings, shard_params
    from jaxedit.sweep.memory import memory_report
    import _sharded_compute as compute

    assert jax.device_count() == 8, jax.devices()
    res = {}
    tokens, mask, corrupt, answer, others = prompts()
    for name, path in (("llama3_gqa", llama_dir), ("gemma3", gemma3_dir)):
        model = jaxedit.load(path)
        mesh = make_mesh(MeshSpec(2, 2, 2))
        res[f"logits/{name}"] = compute.last_logits(model.params, model.cfg, tokens, mask, mesh)
        placed = shard_params(model.params, param_shardings(model.cfg, mesh))
        res[f"wq_shard/{name}"] = np.array(placed["layers"]["attn"]["wq"].addressable_shards[0].data.shape)
        res[f"wk_shard/{name}"] = np.array(placed["layers"]["attn"]["wk"].addressable_shards[0].data.shape)
    # gemma3 (loaded last): heads split on 'tensor', its single kv head not
    sweep = compute.patching_sweep(model.params, model.cfg, tokens, corrupt, mask, spec=MeshSpec(2, 2, 2),
                                   metric=logit_diff, metric_args=(answer, others), site="attn_z")
    res["sweep"], res["sweep_clean"] = sweep.per_example, sweep.clean

    model = jaxedit.load(llama_dir)
    trainable, res["train_losses"], res["mu_shard"] = run_train(model.params, model.cfg, train_batch(),
                                                                make_mesh(MeshSpec(2, 2, 2)))
    res |= _flat("trainable/", trainable)
    seen = {}
    _spy_batch_shards(seen)
    mesh = make_mesh(MeshSpec(data=8))
    placed = dataclasses.replace(model, params=shard_params(model.params, param_shardings(model.cfg, mesh)))
    res |= _flat("dp/", run_data_parallel(placed))
    res |= {f"dp_shard/{name}": np.array(shapes) for name, shapes in seen.items()}
    for spec in ((1, 8, 1), (1, 4, 2)):
        report = memory_report(config_from_hf(GEMMA2_9B), make_mesh(MeshSpec(*spec)), dtype="bfloat16")
        res[f"memory/{spec}"] = np.array([report[k]["per_device"] for k in ("params", "grads", "opt_state")])
    np.savez(out / "devices.npz", **res)


def processes(out: Path, llama_dir):
    from jaxedit.sharding import initialize_distributed

    assert initialize_distributed()
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jaxedit
    from jaxedit.localize.metrics import logit_diff
    from jaxedit.sharding import (MeshSpec, gather, gather_slices, make_mesh, param_shardings, process_path,
                                  process_slice, shard_params)
    import _sharded_compute as compute

    model = jaxedit.load(llama_dir)
    tokens, mask, corrupt, answer, others = prompts()
    mesh = make_mesh(MeshSpec(data=2, tensor=-1))  # spans both processes
    logits = compute.last_logits(model.params, model.cfg, tokens, mask, mesh)
    wq = shard_params(model.params, param_shardings(model.cfg, mesh))["layers"]["attn"]["wq"]
    b = 7  # 4 + 3 prompts: unequal parts
    sweep = compute.patching_sweep(model.params, model.cfg, tokens[:b], corrupt[:b], mask[:b], spec=MeshSpec(fsdp=-1),
                                   metric=logit_diff, metric_args=(answer[:b], others[:b]), site="resid_pre")
    rows = process_slice(b)
    hand = hand_made_parts()
    part = process_slice(len(hand))  # 3 + 2 units: unequal parts
    sliced = gather_slices(hand[part.start:part.stop].T, len(hand), axis=1)  # units on axis 1
    grid = np.arange(24).reshape(8, 3)  # rows 4i..4i+3 on process i, spread over the 2 × 2 devices
    local = grid[4 * jax.process_index():4 * jax.process_index() + 4]
    spread = jax.make_array_from_process_local_data(NamedSharding(make_mesh(MeshSpec(data=-1)), P("data")), local)
    np.savez(process_path(out / "result.npz"), logits=logits, sweep=sweep.per_example, clean=sweep.clean,
             gathered_slices=sliced, gathered_array=gather(spread), spread_is_local=spread.is_fully_addressable,
             rows=np.arange(rows.start, rows.stop), devices=np.array([jax.device_count(), jax.local_device_count()]),
             wq_spans_processes=not wq.is_fully_addressable, wq_local_shards=len(wq.addressable_shards))


if __name__ == "__main__":
    mode, out, *dirs = sys.argv[1:]
    {"devices": devices, "processes": processes}[mode](Path(out), *dirs)
