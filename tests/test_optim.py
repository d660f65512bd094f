"""model.py's optimizer side: Newton-Schulz precision, the fused log-prob path, gradient
sync and sharded Muon on 1 vs 2 processes."""

import os

import torch

import optim
from conftest import REPO, per_token_loss, run_python, run_torchrun
from model import GPT, GPTConfig


def test_newton_schulz_precision_follows_the_cpu(monkeypatch):
    # bf16 matmuls are emulated (10-35x slower) on CPUs without bf16 units: float32 there
    G = torch.randn(40, 24)
    for has_bf16, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
        X = optim.newton_schulz5(G)
        assert X.dtype == dtype and X.shape == G.shape
        s = torch.linalg.svdvals(X.float())
        assert s.min() > 0.5 and s.max() < 1.3


def _tiny(vocab=300):
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    m.init_weights(zero_out=False)
    return m


def test_fused_logprob_sum_equals_plain_path_value_and_gradients():
    m = _tiny()
    x, y = torch.randint(0, 300, (3, 40)), torch.randint(0, 300, (3, 40))
    y[0, :10] = -1
    y[2, 25:] = -1
    plain = -per_token_loss(m, x, y)
    (-plain.sum() / 7).backward()
    plain_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)

    fused = m.token_logprobs(x, y, chunk_numel=300 * 7, reduction="sum")  # 7 rows a chunk: many chunks
    (-fused / 7).backward()  # SFT's loss: minus the sum over its tokens, scaled
    assert fused.shape == () and torch.allclose(fused, plain.sum(), rtol=1e-5)
    for name, p in m.named_parameters():
        assert torch.allclose(p.grad, plain_grads[name], atol=1e-6, rtol=1e-4), name
    with torch.no_grad():  # no graph: the same value
        assert torch.allclose(m.token_logprobs(x, y, reduction="sum"), fused, rtol=1e-5)


def test_logprob_sum_with_no_target_keeps_a_graph():
    m = _tiny()
    x, y = torch.randint(0, 300, (2, 8)), torch.full((2, 8), -1)
    total = m.token_logprobs(x, y, reduction="sum")
    total.backward()
    assert total.item() == 0.0 and m.lm_head.weight.grad is None
    assert all(p.grad is not None and (p.grad == 0).all() for p in m.transformer.h.parameters())


def test_two_processes_step_like_one(tmp_path):
    # overlapped bucket sync, the unarmed fallback, a rank without lm_head grad, sharded Muon
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run_python([os.path.join(REPO, "tests", "dist_optim_step.py"), str(one)])
    run_torchrun([os.path.join(REPO, "tests", "dist_optim_step.py"), str(two)], nproc=2)
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert "lm_head.weight" in b["grads"] and len(a["grads"]) > len(b["grads"])  # rank 0 sums its own matrices
    for name in b["grads"]:
        assert torch.allclose(a["grads"][name], b["grads"][name], atol=1e-6, rtol=1e-5), name
    # the model crosses the wire about twice a step: gradients summed, matrices on their owner only, then
    # broadcast (all-reducing every gradient and broadcasting the matrices was about three times)
    assert a["wire"] == [0, 0, 0] and max(b["wire"]) <= 2.05 * b["model_bytes"], (b["wire"], b["model_bytes"])
    for name, p in a["params"].items():
        update = (p - a["initial"][name]).norm()
        assert update > 0, name
        # float summation order differs between 1 and 2 processes; Adam's g/sqrt(v) amplifies
        # it in tiny gradients, so compare relative to the update (a skipped sync is off by ~90%)
        assert (p - b["params"][name]).norm() / update < 1e-4, name


def test_one_process_group_does_no_collective(tmp_path, monkeypatch):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        def refuse(*args, **kwargs):
            raise AssertionError("a collective on one process")
        for name in ("all_reduce", "all_gather", "broadcast"):
            monkeypatch.setattr(dist, name, refuse)
        m = _tiny()
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        optimizers, grad_sync = optim.setup_optimizers(m), optim.GradSync(m)
        for armed in (False, True):
            if armed:
                grad_sync.arm()
            x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
            (-m.token_logprobs(x, y, reduction="sum")).backward()
            optim.optimizer_step(m, optimizers, 1.0, grad_sync)
        assert all(not torch.equal(p, before[n]) for n, p in m.named_parameters())
    finally:
        dist.destroy_process_group()


def _firing_order(m, x, y):
    """The order in which backward finishes each parameter's gradient."""
    fired, handles = [], [p.register_post_accumulate_grad_hook(lambda p: fired.append(id(p))) for p in m.parameters()]
    (-m.token_logprobs(x, y, reduction="sum")).backward()
    for h in handles:
        h.remove()
    return fired


def test_gradient_buckets_follow_the_order_gradients_become_ready():
    """A bucket is sent once all its gradients are final: in the order of parameters() reversed, 2026's first
    bucket held smear's gate, ready only when backward ends, so nothing overlapped."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=64, vocab_size=300, n_layer=4, n_head=2, n_kv_head=2, n_embd=32,
                      window_pattern="SSSL"))
    m.init_weights(zero_out=False)
    fired = _firing_order(m, torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32)))
    position = {pid: i for i, pid in enumerate(fired)}
    order = [position[id(p)] for p in optim.ready_order(m)]
    assert sorted(order) == list(range(len(fired)))  # every parameter once
    # the first half of the order is ready before the last quarter of backward begins
    assert max(order[:len(order) // 2]) < 0.75 * len(order)
    assert position[id(next(reversed(list(m.parameters()))))] > 0.75 * len(order)  # the old first bucket's


def test_gradients_live_in_the_buckets(tmp_path, monkeypatch):
    """Under several processes each gradient is a view of its bucket, so syncing keeps no second copy of every
    gradient (16 GB at d32); backward accumulates into the views and a step zeroes them in place."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        m = _tiny()
        with monkeypatch.context() as patch:  # buckets as for two processes; a group of one reduces nothing
            patch.setattr(dist, "get_world_size", lambda *a: 2)
            optimizers, sync = optim.setup_optimizers(m), optim.GradSync(m, bucket_numel=2000)
        assert len(sync.flats) > 1
        storages = {p.grad.untyped_storage().data_ptr() for p in m.parameters()}
        assert storages == {f.untyped_storage().data_ptr() for f in sync.flats}
        x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
        expected = _tiny()
        (-expected.token_logprobs(x, y, reduction="sum")).backward()
        sync.arm()
        (-m.token_logprobs(x, y, reduction="sum")).backward()
        for p, q in zip(m.parameters(), expected.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6)
        optim.optimizer_step(m, optimizers, 1.0, sync)
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
        assert {p.grad.untyped_storage().data_ptr() for p in m.parameters()} == storages
    finally:
        dist.destroy_process_group()


def test_2026_optimizer_steps_as_nanochat_92d63d4(monkeypatch):
    """Two steps with fixed gradients on the 2026 fixture move every tensor as nanochat 92d63d4's MuonAdamW
    did (golden_optim_step.pt, made by its own code in float32: Polar Express, NorMuon, cautious decay)."""
    from checkpoint import load_model
    from conftest import golden_dir

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # nanochat's CPU runs float32
    gold = torch.load(os.path.join(golden_dir(2026), "golden_optim_step.pt"), weights_only=True)
    m, _, _ = load_model("base", "cpu", "train", base_dir=golden_dir(2026))
    optimizers = optim.setup_optimizers(m, unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.2)
    assert optimizers[1].param_groups[0]["rule"] == "2026"
    sync = optim.GradSync(m)
    for step, grads in enumerate(gold["grads"]):
        for name, p in m.named_parameters():
            p.grad = grads[name].clone()
        optim.optimizer_step(m, optimizers, 1.0 - 0.25 * step, sync)
    for name, p in m.named_parameters():
        want = gold["params"][name]
        assert torch.allclose(p.detach(), want, rtol=0, atol=1e-6 * max(1.0, want.abs().max().item())), name


def test_2026_warm_start_from_nanochat_optimizer_shards(tmp_path, monkeypatch):
    """chat_sft --load-optimizer: continuing from the shard nanochat 92d63d4 wrote after one step, our second
    step lands where nanochat's own second step did."""
    import shutil

    from checkpoint import load_model, load_optimizer_shards
    from conftest import golden_dir

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    gold = torch.load(os.path.join(golden_dir(2026), "golden_optim_step.pt"), weights_only=True)
    base = tmp_path / "base"
    shutil.copytree(golden_dir(2026), base)
    torch.save(gold["after_one_step"]["optimizer"], base / "base_checkpoints" / "d2" / "optim_000020_rank0.pt")
    m, _, _ = load_model("base", "cpu", "train", base_dir=str(base))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(gold["after_one_step"]["params"][name])
    optimizers = optim.setup_optimizers(m, unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.0)
    optim.warm_start(optimizers, load_optimizer_shards(str(base / "base_checkpoints" / "d2"), 20), "shard")
    assert optimizers[1].param_groups[0]["weight_decay"] == 0.2  # the pretraining's, as nanochat takes it
    for name, p in m.named_parameters():
        p.grad = gold["grads"][1][name].clone()
    optim.optimizer_step(m, optimizers, 0.75, optim.GradSync(m))
    for name, p in m.named_parameters():
        want = gold["params"][name]
        assert torch.allclose(p.detach(), want, rtol=0, atol=1e-6 * max(1.0, want.abs().max().item())), name
