"""Sharding: mesh specs, the rules table, memory planning for Gemma-2-9B, and sharded runs equal to 1-device runs.

The 8-device and 2-process runs happen in subprocesses (tests/_sharding_worker.py), which need
XLA_FLAGS / JAX_* set before jax starts; the references are the plain library on this process's
single device.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, PartitionSpec as P

import jaxedit
from conftest import xla_flags
from _sharding_worker import (GEMMA2_9B, TRAIN_STEPS, data_parallel_inputs, hand_made_parts, prompts, run_train,
                              train_batch, train_setup)
from jaxedit.edit import losses
from jaxedit.errors import JaxeditError
from jaxedit.localize import activation_patching as ap
from jaxedit.localize import components as C
from jaxedit.localize.metrics import logit_diff
from jaxedit.models.config import config_from_hf
from jaxedit.models.params import param_shapes
from jaxedit.sharding import (DEFAULT_RULES, MeshSpec, abstract_mesh, batch_sharding, gather_slices, initialize_distributed,
                              make_mesh, param_specs, process_path, process_slice)
from jaxedit.sharding.multihost import ENV
from jaxedit.sweep.memory import memory_report
from tiny_models import make_hf_model, save_hf_model

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).parent / "_sharding_worker.py"
TINY = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=96, hidden_act="silu", tie_word_embeddings=False)


# ---------------------------------------------------------------- mesh and rules (this process)

def test_mesh_spec_resolves_minus_one_and_rejects_misfits():
    assert MeshSpec(data=-1, tensor=2).sizes(8) == (4, 1, 2)
    assert MeshSpec(fsdp=4, tensor=2).sizes(8) == (1, 4, 2)
    with pytest.raises(JaxeditError, match=r"mesh data=3 × fsdp=1 × tensor=1 needs 3 devices, 8 are visible"):
        MeshSpec(data=3).sizes(8)
    with pytest.raises(JaxeditError, match="multiple of 3 devices"):
        MeshSpec(data=-1, fsdp=3).sizes(8)
    for bad in (MeshSpec(data=-1, fsdp=-1), MeshSpec(tensor=0), MeshSpec(data=-2)):
        with pytest.raises(JaxeditError, match="invalid"):
            bad.sizes(8)


def test_make_mesh_on_this_process():
    mesh = make_mesh(MeshSpec(data=-1))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.axis_sizes == (jax.device_count(), 1, 1)
    assert mesh.axis_types == (AxisType.Auto,) * 3  # jax.make_mesh alone would give Explicit axes
    with pytest.raises(JaxeditError, match=f"needs {jax.device_count() + 1} devices"):
        make_mesh(MeshSpec(tensor=jax.device_count() + 1))


def test_param_specs_follow_the_rules_and_drop_non_dividing_axes():
    cfg = config_from_hf(TINY)
    specs, notes = param_specs(cfg, abstract_mesh(MeshSpec(fsdp=2, tensor=2), 4))
    assert notes == []
    attn, mlp = specs["layers"]["attn"], specs["layers"]["mlp"]
    assert attn["wq"] == attn["wk"] == attn["wv"] == P(None, "fsdp", "tensor", None)
    assert attn["wo"] == P(None, "tensor", None, "fsdp")
    assert mlp["w_up"] == mlp["w_gate"] == P(None, "fsdp", "tensor") and mlp["w_down"] == P(None, "tensor", "fsdp")
    assert specs["embed"]["tokens"] == P("tensor", "fsdp") and specs["unembed"]["w"] == P("fsdp", "tensor")
    assert specs["layers"]["attn_norm"]["scale"] == P(None, "fsdp") and specs["final_norm"]["scale"] == P("fsdp")

    odd = config_from_hf(TINY | dict(num_key_value_heads=1, vocab_size=97))
    specs, notes = param_specs(odd, abstract_mesh(MeshSpec(fsdp=2, tensor=2), 4))
    assert specs["layers"]["attn"]["wk"] == P(None, "fsdp", None, None)
    assert specs["embed"]["tokens"] == P(None, "fsdp") and specs["unembed"]["w"] == P("fsdp", None)
    assert len(notes) == 4
    assert sum("kv_heads (1)" in n for n in notes) == 2 and sum("vocab (97)" in n for n in notes) == 2

    same_axis = tuple((k, "fsdp" if k == "mlp" else v) for k, v in DEFAULT_RULES)
    specs, notes = param_specs(cfg, abstract_mesh(MeshSpec(fsdp=2, tensor=2), 4), same_axis)
    assert specs["layers"]["mlp"]["w_up"] == P(None, "fsdp", None) and any("already used" in n for n in notes)
    with pytest.raises(JaxeditError, match="no sharding rule"):
        param_specs(cfg, abstract_mesh(MeshSpec(), 1), tuple(r for r in DEFAULT_RULES if r[0] != "mlp"))
    with pytest.raises(JaxeditError, match="names no mesh axis"):
        param_specs(cfg, abstract_mesh(MeshSpec(), 1), DEFAULT_RULES + (("mlp", "model"),))


def test_batch_sharding_splits_on_data_or_replicates():
    mesh = abstract_mesh(MeshSpec(data=4, fsdp=2), 8)
    assert batch_sharding(mesh, 8, 3).spec == P("data", None, None)
    assert batch_sharding(mesh, 6).spec == P(None, None)  # 6 prompts on data=4: every device holds all
    assert batch_sharding(mesh, 8).shard_shape((8, 5)) == (2, 5)


# ---------------------------------------------------------------- multi-process helpers (this process)

@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_process_slice_partitions_like_array_split(count):
    for n in range(0, 23):
        parts = [process_slice(n, i, count) for i in range(count)]
        want = np.array_split(np.arange(n), count)
        assert [list(p) for p in parts] == [w.tolist() for w in want]


def test_process_path_and_single_process_gather(tmp_path):
    out = tmp_path / "scores.npz"
    assert process_path(out) == out
    names = {process_path(out, i, 3).name for i in range(3)}
    assert names == {f"scores.process00{i}-of-003.npz" for i in range(3)}
    x = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(gather_slices(x, 4, axis=1), x)
    with pytest.raises(JaxeditError, match="process_slice has 5"):
        gather_slices(x, 5, axis=1)


def test_initialize_distributed_reads_the_environment(monkeypatch):
    for key in ENV + ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert initialize_distributed() is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    with pytest.raises(JaxeditError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID is not"):
        initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    jax.devices()  # the backend is up: too late to join a cluster
    with pytest.raises(JaxeditError, match="before any JAX computation"):
        initialize_distributed()


# ---------------------------------------------------------------- Gemma-2-9B memory plan (abstract mesh)

L, D, H, K, E, F, V = 42, 3584, 16, 8, 256, 14336, 256000
NORMS = L * 4 * D + D  # attn/mlp pre and post norms per layer, final norm
MLPS = 3 * L * D * F  # w_up, w_gate, w_down of all layers (stacked leaves)


def _gemma2_9b():
    return config_from_hf(GEMMA2_9B)


def _flu_mask(cfg):
    return C.localization("manual_interp", C.mlp_layers(cfg, range(2, 7)), cfg).mask  # sports FLU: MLPs 2-6


@pytest.mark.parametrize("spec", [MeshSpec(fsdp=8), MeshSpec(fsdp=4, tensor=2)], ids=["fsdp8", "fsdp4xtensor2"])
@pytest.mark.parametrize("dtype, size", [("bfloat16", 2), ("float32", 4)])
def test_gemma2_9b_memory_report_on_8_devices(spec, dtype, size):
    cfg = _gemma2_9b()
    n_params = V * D + L * (2 * D * H * E + 2 * D * K * E + 3 * D * F) + NORMS
    assert n_params == 9_241_705_984  # google/gemma-2-9b's published parameter count
    # every leaf has a `embed` (3584) axis, split 8 ways by fsdp=8; with tensor=2 the norms ([L,D], [D])
    # have no tensor axis, so they are split 4 ways and replicated over tensor
    params = n_params * size // 8 if spec.fsdp == 8 else ((n_params - NORMS) // 8 + NORMS // 4) * size
    full = memory_report(cfg, abstract_mesh(spec, 8), dtype=dtype)
    flu = memory_report(cfg, abstract_mesh(spec, 8), dtype=dtype, trainable_mask=_flu_mask(cfg))
    assert full["notes"] == [] and full["n_params"] == n_params and full["n_trainable"] == n_params
    assert full["params"] == {"global": n_params * size, "per_device": params}
    assert full["grads"]["per_device"] == params
    assert 0 <= full["opt_state"]["per_device"] - 2 * params <= 64  # mu, nu + step counts
    assert flu["params"] == full["params"] and flu["n_trainable"] == 5 * 3 * D * F == 770_703_360
    rows = 8 * 3 * D * F  # the 5 trained MLP layers of the stack, padded to 8 rows (`components.trained_rows`)
    assert flu["grads"]["per_device"] == rows * size // 8 < MLPS * size // 8
    assert 0 <= flu["opt_state"]["per_device"] - 2 * rows * size // 8 <= 64
    assert full["total"]["per_device"] == sum(full[k]["per_device"] for k in ("params", "grads", "opt_state"))
    print(f"\n[{spec}, {dtype}] full fine-tune\n{full['table']}\n[{spec}, {dtype}] FLU MLPs 2-6\n{flu['table']}")


def test_memory_report_beyond_the_devices_present():
    cfg = _gemma2_9b()
    report = memory_report(cfg, abstract_mesh(MeshSpec(fsdp=-1), 64), dtype="bfloat16", optimizer=None)
    assert report["n_devices"] == 64 and report["params"]["per_device"] == 9_241_705_984 * 2 // 64
    assert report["grads"]["per_device"] == report["opt_state"]["per_device"] == 0
    with pytest.raises(JaxeditError, match="unknown optimizer"):
        memory_report(cfg, abstract_mesh(MeshSpec(), 1), optimizer="sgd")


# ---------------------------------------------------------------- sharded runs vs one device

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding_models")
    for name in ("gemma3", "llama3_gqa"):
        save_hf_model(name, root / name)
    return {name: root / name for name in ("gemma3", "llama3_gqa")}


def _env(**extra):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    for key in ENV:
        env.pop(key, None)
    return env | extra | {"XLA_FLAGS": xla_flags(extra.get("XLA_FLAGS", ""))}


def _check(procs):
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]


@pytest.fixture(scope="module")
def eight_devices(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eight")
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    _check([subprocess.Popen([sys.executable, WORKER, "devices", out, tiny_dirs["gemma3"], tiny_dirs["llama3_gqa"]],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)])
    return dict(np.load(out / "devices.npz"))


@pytest.fixture(scope="module")
def two_processes(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("processes")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, WORKER, "processes", out, tiny_dirs["llama3_gqa"]],
                              env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
                                       JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    _check(procs)
    return [dict(np.load(out / f"result.process00{i}-of-002.npz")) for i in range(2)]


def _reference_logits(path):
    model = jaxedit.load(path)
    tokens, mask = prompts()[:2]
    return np.asarray(jax.jit(losses.last_logits, static_argnums=1)(model.params, model.cfg, tokens, mask))


def _reference_sweep(path, b=8, site="attn_z"):
    model = jaxedit.load(path)
    tokens, mask, corrupt, answer, others = (a[:b] for a in prompts())
    return ap.patching_sweep(model.params, model.cfg, tokens, corrupt, mask, metric=logit_diff,
                             metric_args=(answer, others), site=site)


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("name", ["gemma3", "llama3_gqa"])
def test_logits_sharded_over_8_devices_equal_one_device(eight_devices, tiny_dirs, name):
    want = _reference_logits(tiny_dirs[name])
    got = eight_devices[f"logits/{name}"]
    print(f"\n{name}: 8 devices (data=2 × fsdp=2 × tensor=2) vs 1 device, max |Δlogit| = {_max_diff(got, want):.3g}")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cfg = jaxedit.load(tiny_dirs[name]).cfg
    kv = cfg.n_kv_heads // 2 if cfg.n_kv_heads % 2 == 0 else cfg.n_kv_heads  # gemma3 has 1 kv head: not split
    assert tuple(eight_devices[f"wq_shard/{name}"]) == (cfg.n_layers, cfg.d_model // 2, cfg.n_heads // 2, cfg.head_dim)
    assert tuple(eight_devices[f"wk_shard/{name}"]) == (cfg.n_layers, cfg.d_model // 2, kv, cfg.head_dim)


def test_patching_sweep_over_8_devices_equals_one_device(eight_devices, tiny_dirs):
    want = _reference_sweep(tiny_dirs["gemma3"])
    print(f"\ngemma3 attn_z sweep: max |Δ| = {_max_diff(eight_devices['sweep'], want.per_example):.3g}")
    assert eight_devices["sweep"].shape == want.per_example.shape == (4, 4, 8)
    np.testing.assert_allclose(eight_devices["sweep"], want.per_example, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eight_devices["sweep_clean"], want.clean, rtol=1e-5, atol=1e-5)


def test_masked_train_steps_over_8_devices_equal_one_device(eight_devices, tiny_dirs):
    model = jaxedit.load(tiny_dirs["llama3_gqa"])
    want, want_losses, _ = run_train(model.params, model.cfg, train_batch())
    mask = train_setup(model.cfg)[0]
    np.testing.assert_allclose(eight_devices["train_losses"], want_losses, rtol=1e-5)
    assert tuple(eight_devices["mu_shard"]) == (model.cfg.n_layers, 16, 24)  # Adam's mu sharded like w_up
    worst = 0.0
    for group, names in (("attn", C.ATTN), ("mlp", C.MLP)):
        for n in names:
            got, ref = eight_devices[f"trainable/layers/{group}/{n}"], np.asarray(want["layers"][group][n])
            start = np.asarray(model.params["layers"][group][n])
            frozen = ~np.broadcast_to(mask["layers"][group][n], start.shape)
            assert frozen.any() and (~frozen).any() and not np.array_equal(got[~frozen], start[~frozen])
            np.testing.assert_array_equal(got[frozen].view(np.uint32), start[frozen].view(np.uint32))
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
            worst = max(worst, _max_diff(got, ref))
    print(f"\nllama3_gqa, {len(want_losses)} masked steps: max |Δparam| 8 devices vs 1 = {worst:.3g}")


def _torch_masked_training(hf, cfg, batch) -> np.ndarray:
    """Losses [TRAIN_STEPS] of the masked AdamW run (`train_setup`: lr 1e-2, weight decay 0.1, clip 1.0) written
    in torch: gradients masked, clipped by their global norm, torch's AdamW, frozen entries put back."""
    mask, _, _ = train_setup(cfg)
    h, k, e, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    as_torch = {  # jaxedit leaf layout of one layer -> the HF weight's [out, in] layout
        "wq": lambda m: m.reshape(d, h * e).T, "wk": lambda m: m.reshape(d, k * e).T,
        "wv": lambda m: m.reshape(d, k * e).T, "wo": lambda m: m.reshape(h * e, d).T,
        "w_up": lambda m: m.T, "w_gate": lambda m: m.T, "w_down": lambda m: m.T}
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w_up": "mlp.up_proj", "w_gate": "mlp.gate_proj", "w_down": "mlp.down_proj"}
    shapes = param_shapes(cfg)["layers"]
    weights, masks = [], []
    for group, leaves in (("attn", C.ATTN), ("mlp", C.MLP)):
        for leaf in leaves:
            full = np.broadcast_to(mask["layers"][group][leaf], shapes[group][leaf])
            for layer in range(cfg.n_layers):
                if full[layer].any():
                    weights.append(hf.get_submodule(f"model.layers.{layer}.{names[leaf]}").weight)
                    masks.append(torch.as_tensor(np.ascontiguousarray(as_torch[leaf](full[layer]))))
    opt = torch.optim.AdamW(weights, lr=1e-2, weight_decay=0.1)
    b = batch["forget"]
    last = torch.as_tensor(b["mask"].sum(1) - 1)
    out = []
    for _ in range(TRAIN_STEPS):
        before = [w.detach().clone() for w in weights]
        logits = hf(input_ids=torch.as_tensor(b["tokens"]), attention_mask=torch.as_tensor(b["mask"])).logits
        loss = torch.nn.functional.cross_entropy(logits[torch.arange(len(last)), last],
                                                 torch.as_tensor(b["target"]).long())
        opt.zero_grad()
        loss.backward()
        for w, m in zip(weights, masks):
            w.grad *= m
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        opt.step()
        with torch.no_grad():
            for w, m, old in zip(weights, masks, before):
                w[~m] = old[~m]
        out.append(float(loss))
    return np.array(out)


def _torch_references(hf, cfg) -> dict:
    """What `run_data_parallel` computes, written in torch on the same model: masked training losses, next-token CE
    and accuracy over real tokens (KL to itself: 0), each layer's input residual at the last real token, and the
    resid_pre patching sweep (clean residual at one layer and position into the corrupt run, logit difference)."""
    batch, (tokens, mask), (clean, corrupt, sweep_mask, answer, others) = data_parallel_inputs()
    out = {"losses": _torch_masked_training(make_hf_model("llama3_gqa"), cfg, batch)}
    with torch.no_grad():
        run = hf(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask), output_hidden_states=True)
        logp = torch.log_softmax(run.logits[:, :-1].double(), -1).numpy()
        real = (mask[:, 1:] * mask[:, :-1]).astype(bool)
        nxt = tokens[:, 1:]
        picked = np.take_along_axis(logp, nxt[..., None], -1)[..., 0]
        out["text"] = np.array([-picked[real].mean(), (logp.argmax(-1) == nxt)[real].mean(), 0.0])
        last = mask.sum(1) - 1
        out["resid"] = np.stack([hs[np.arange(len(last)), last].numpy() for hs in run.hidden_states[:-1]])
        cache = {}
        handles = [layer.register_forward_pre_hook(lambda mod, args, i=i: cache.__setitem__(i, args[0].clone()))
                   for i, layer in enumerate(hf.model.layers)]
        hf(input_ids=torch.as_tensor(clean), attention_mask=torch.as_tensor(sweep_mask))
        for handle in handles:
            handle.remove()
        end = sweep_mask.sum(1) - 1
        sweep = np.zeros((cfg.n_layers, clean.shape[1], len(clean)))
        for layer in range(cfg.n_layers):
            for pos in range(clean.shape[1]):
                def patch(mod, args, layer=layer, pos=pos):
                    x = args[0].clone()
                    x[:, pos] = cache[layer][:, pos]
                    return (x,) + args[1:]
                handle = hf.model.layers[layer].register_forward_pre_hook(patch)
                logits = hf(input_ids=torch.as_tensor(corrupt), attention_mask=torch.as_tensor(sweep_mask)).logits
                handle.remove()
                at_end = logits[np.arange(len(end)), end].numpy()
                sweep[layer, pos] = np.asarray(logit_diff(at_end, answer, others))
        out["sweep"] = sweep
    return out


def test_data_axis_gives_each_device_an_eighth_of_every_hot_paths_batch_and_transformers_results(eight_devices,
                                                                                                 tiny_dirs):
    """Params on a data=8 mesh: training, general-text metrics, residual reads and a patching sweep get their
    batches of 8 split one row per device, and return what the same computations written in torch return."""
    shards = {k.removeprefix("dp_shard/"): v for k, v in eight_devices.items() if k.startswith("dp_shard/")}
    assert set(shards) == {"_train_step", "_text_sums", "read_jit", "_sweep"}
    for name, (shape, shard) in shards.items():
        assert shape[0] == 8 and tuple(shard) == (1, *shape[1:]), name
    cfg = jaxedit.load(tiny_dirs["llama3_gqa"]).cfg
    want = _torch_references(make_hf_model("llama3_gqa"), cfg)
    worst = 0.0
    for key, value in want.items():
        np.testing.assert_allclose(eight_devices[f"dp/{key}"], value, rtol=1e-4, atol=1e-4, err_msg=key)
        worst = max(worst, _max_diff(eight_devices[f"dp/{key}"], value))
    assert want["losses"][-1] < want["losses"][0] and np.abs(want["sweep"]).max() > 0.05
    print(f"\nllama3_gqa on data=8 vs transformers: max |Δ| {worst:.3g} over {len(want)} outputs")


def test_memory_report_on_real_8_device_mesh_matches_abstract(eight_devices):
    cfg = _gemma2_9b()
    for spec in ((1, 8, 1), (1, 4, 2)):
        report = memory_report(cfg, abstract_mesh(MeshSpec(*spec), 8), dtype="bfloat16")
        want = [report[k]["per_device"] for k in ("params", "grads", "opt_state")]
        np.testing.assert_array_equal(eight_devices[f"memory/{spec}"], want)


def test_two_processes_equal_one(two_processes, tiny_dirs):
    logits = _reference_logits(tiny_dirs["llama3_gqa"])
    sweep = _reference_sweep(tiny_dirs["llama3_gqa"], b=7, site="resid_pre")
    for i, res in enumerate(two_processes):
        assert tuple(res["devices"]) == (4, 2)
        assert res["wq_spans_processes"] and res["wq_local_shards"] == 2
        assert res["rows"].tolist() == [[0, 1, 2, 3], [4, 5, 6]][i]
        print(f"\nprocess {i}: max |Δlogit| {_max_diff(res['logits'], logits):.3g}, "
              f"max |Δsweep| {_max_diff(res['sweep'], sweep.per_example):.3g}")
        np.testing.assert_allclose(res["logits"], logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res["sweep"], sweep.per_example, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res["clean"], sweep.clean, rtol=1e-5, atol=1e-5)


def test_two_processes_gather_hand_made_parts(two_processes):
    """gather_slices joins each process's unequal part (3 + 2 units) in process order; gather brings an array
    whose rows live on the other process's devices to every host whole."""
    for res in two_processes:
        np.testing.assert_array_equal(res["gathered_slices"], hand_made_parts().T)
        assert not res["spread_is_local"]
        np.testing.assert_array_equal(res["gathered_array"], np.arange(24).reshape(8, 3))
