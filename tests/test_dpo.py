"""dpo.py: the loss, sequence log-probs, training, the reference cache, 1 vs 2 processes."""

import copy
import json
import math
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

import dpo
import tasks
from common import Dist, UserError
from conftest import REPO, make_tiny_base, per_token_loss, run_python, run_torchrun
from checkpoint import load_model, save_checkpoint
from model import GPT, GPTConfig

TOPICS = ["stops", "sizing", "leverage", "hype", "journals", "drawdowns", "options", "fees", "crypto", "news"]


def pairs(n, seed=0):
    """Disciplined (chosen) vs reckless (rejected) answers: a pattern a tiny model can learn
    from some pairs and recognise in held-out ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        out.append({"prompt": f"#{i} what about {topic}?",
                    "chosen": f"Risk first: on {topic}, size so the stop costs 1%.",
                    "rejected": f"Go all in on {topic} now, it will moon for sure!"})
    return out


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def make_sft_base(base_dir, n_pairs=96):
    """A tiny base copied to chatsft_checkpoints (DPO's default source) plus pair data."""
    base = make_tiny_base(base_dir)
    m, _, meta = load_model("base", "cpu", "eval", base_dir=base)
    save_checkpoint(os.path.join(base, "chatsft_checkpoints", "d2"), 0, m.state_dict(), meta)
    write_jsonl(os.path.join(base, "datasets", "trader_dpo_data.jsonl"), pairs(n_pairs))
    return base


@pytest.fixture
def sft_base(tmp_path, monkeypatch):
    base = make_sft_base(tmp_path / "base")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    return base


def run_dpo(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["dpo.py", *args])
    dpo.main()


FAST = ["--device_batch_size=4", "--target_examples_per_step=8", "--val_fraction=0.2", "--max_length=96"]


# -----------------------------------------------------------------------------
# Pure pieces


def test_dpo_loss_matches_hand_computed_values():
    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    rc, rr = torch.tensor([-11.0, -20.0]), torch.tensor([-11.0, -16.0])
    # margins of log-ratios: (-10+12) - (-11+11) = 2 ; (-20+15) - (-20+16) = -1
    losses = dpo.DPOLoss(beta=0.5)(pc - pr, rc - rr)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))])
    ls = dpo.DPOLoss(beta=0.5, label_smoothing=0.1)(pc - pr, rc - rr)
    sig = lambda z: 1 / (1 + math.exp(-z))
    assert ls[0].item() == pytest.approx(-0.9 * math.log(sig(1.0)) - 0.1 * math.log(sig(-1.0)))
    ipo = dpo.DPOLoss(beta=0.5, loss_type="ipo")(pc - pr, rc - rr)
    assert ipo.tolist() == pytest.approx([(2 - 1) ** 2, (-1 - 1) ** 2])


def tiny_pairs(n=3):
    """n rendered pairs of random tokens (the answers scored from position 4 on) and a tiny GPT."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=32, vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    m.init_weights(zero_out=False)
    row = lambda length: (torch.randint(1, 50, (length,), dtype=torch.int32), torch.arange(length) >= 4)
    return m, [dpo.Pair(row(10 + i), row(12 - i), f"pair {i}") for i in range(n)]


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    logps = torch.tensor([-3.0, -7.5, -1.25])
    assert dpo.DPOLoss(beta=0.1)(logps - (logps - 1), logps - (logps - 1)).tolist() == pytest.approx([math.log(2)] * 3)
    m, pairs = tiny_pairs()
    with torch.no_grad():
        loss, stats = dpo.pair_losses(m, m, pairs, [0, 2], 0, dpo.DPOLoss(0.1), "cpu")
    assert loss is None and (stats.pairs, stats.real_tokens, stats.positions) == (2, 9 + 11 + 11 + 9, 4 * 11)
    assert stats.loss == pytest.approx(2 * math.log(2)) and stats.margin == stats.correct == 0
    assert stats.chosen_reward == stats.rejected_reward == 0 and stats.chosen_logp < 0


def test_the_live_reference_on_a_gpu_scores_as_the_policy_under_autocast(tmp_path):
    """On CUDA the reference keeps its matrices in bf16 (autocast hands the policy's to the matmuls in bf16 anyway)
    and the token embedding float32: at step 0 it scores exactly as the policy (a whole bf16 copy drifted ~0.3 nats
    a sequence, so rewards were not 0). CPU bf16 autocast stands in for CUDA's."""
    from checkpoint import fresh_base
    fresh_base(str(tmp_path), depth=2, zero_out=False)
    model, _, _ = load_model("base", "cpu", "train", base_dir=str(tmp_path))
    model.get_device = lambda: torch.device("cuda")  # what freeze asks
    reference = dpo.freeze(model)
    assert reference.lm_head.weight.dtype == torch.bfloat16 and reference.transformer.wte.weight.dtype == torch.float32
    ids, targets = (torch.randint(0, 256, (4, 120), generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(reference.token_logprobs(ids, targets), model.token_logprobs(ids, targets))


@pytest.mark.parametrize("training", [True, False])
def test_held_out_evaluation_keeps_the_models_mode(training):
    m, pairs = tiny_pairs()
    m.train(training)
    means = dpo.evaluate_pairs(m, m, pairs, 0, dpo.DPOLoss(0.1), 2,
                               Dist(rank=0, world_size=1, device=torch.device("cpu")))
    assert m.training == training
    assert means["loss"] == pytest.approx(math.log(2)) and means["rewards/margins"] == 0


@pytest.mark.parametrize("pattern", [None, "SL"])
def test_fused_pair_loss_equals_full_logits_path(pattern):
    """DPO's training path (model.pair_loss: each pair's gradient taken in the forward pass, once
    both its sums are known) gives the loss, log-probs and gradients of full logits + dpo_loss;
    2026's padded lm_head rows get a zero gradient."""
    torch.manual_seed(0)
    extra = {} if pattern is None else {"window_pattern": pattern}
    m = GPT(GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, **extra))
    m.init_weights(zero_out=False)
    x, y = torch.randint(0, 300, (6, 40)), torch.randint(0, 300, (6, 40))
    y[:, :8] = -1  # prompts
    y[1, 30:] = -1  # padding
    y[4, 12:] = -1
    ref_chosen, ref_rejected = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    dpo_loss = dpo.DPOLoss(beta=0.5, label_smoothing=0.1)
    logps = -per_token_loss(m, x, y).view(6, 40).masked_fill(y == -1, 0).sum(1)
    expected = dpo_loss(logps[:3] - logps[3:], ref_chosen - ref_rejected).sum()
    (expected * 0.25).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)

    loss, chosen, rejected = m.pair_loss(x, y, lambda i, margin: dpo_loss(margin, ref_chosen[i] - ref_rejected[i]),
                                         chunk_numel=300 * 7)  # 7 rows a chunk: several per row
    (loss * 0.25).backward()
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    assert torch.allclose(chosen, logps[:3], rtol=1e-5) and torch.allclose(rejected, logps[3:], rtol=1e-5)
    assert not chosen.requires_grad
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6, rtol=1e-4), n
    if pattern:
        assert m.lm_head.weight.size(0) == 320 and (m.lm_head.weight.grad[300:] == 0).all()


def test_ipo_per_token_is_trls_form_on_token_means():
    """--loss_type=ipo_per_token: IPO on each answer's mean log-prob per token (TRL's), its fused gradient equal to
    autograd's through full logits; `ipo` stays on sums (beta values do not carry between the two)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=64, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    m.init_weights(zero_out=False)
    x, y = torch.randint(0, 300, (4, 30)), torch.randint(0, 300, (4, 30))
    y[:, :6] = -1
    y[1, 20:] = -1
    n = (y != -1).sum(1).float()
    ref = torch.randn(4, dtype=torch.float64)
    dpo_loss = dpo.DPOLoss(beta=0.2, loss_type="ipo_per_token")
    logps = -per_token_loss(m, x, y).view(4, 30).masked_fill(y == -1, 0).sum(1)
    means, ref_means = logps / n, ref / n
    expected = dpo_loss(means[:2] - means[2:], ref_means[:2] - ref_means[2:]).sum()
    assert not torch.isclose(expected, dpo.DPOLoss(beta=0.2, loss_type="ipo")(
        logps[:2] - logps[2:], ref[:2] - ref[2:]).sum())
    expected.backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    weights = [(1 / n[i].item(), 1 / n[2 + i].item()) for i in range(2)]
    ref_margin = [ref[i] / n[i] - ref[2 + i] / n[2 + i] for i in range(2)]
    loss = m.pair_loss(x, y, lambda i, margin: dpo_loss(margin, ref_margin[i]), weights=weights)[0]
    loss.backward()
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    for k, p in m.named_parameters():
        assert torch.allclose(p.grad, grads[k], atol=1e-6, rtol=1e-4), k


@pytest.mark.parametrize("loss_type, pattern", [("sigmoid", None), ("ipo_per_token", "SL")])
def test_rpo_alpha_adds_the_chosen_answers_nll_per_token(loss_type, pattern):
    """--rpo_alpha=A: each pair's loss gains A * the chosen answer's NLL per token (-A chosen / its tokens), its
    gradient added in the fused forward (the chosen row only) equal to autograd's through full logits, for the
    lm_head and the body; A = 0 is today's computation bit for bit."""
    torch.manual_seed(0)
    extra = {} if pattern is None else {"window_pattern": pattern}
    m = GPT(GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, **extra))
    m.init_weights(zero_out=False)
    reference = copy.deepcopy(m).requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    row = lambda length: (torch.randint(1, 300, (length,), dtype=torch.int32), torch.arange(length) >= 5)
    pairs = [dpo.Pair(row(20 + 3 * i), row(26 - 2 * i), f"pair {i}") for i in range(3)]
    indices, alpha = [0, 1, 2], 0.7

    def fused(rpo_alpha):
        m.zero_grad(set_to_none=True)
        loss, stats = dpo.pair_losses(m, reference, pairs, indices, 0, dpo.DPOLoss(0.3, loss_type, 0.0, rpo_alpha),
                                      "cpu")
        (loss / 8).backward()
        return loss.detach(), stats, {n: p.grad.clone() for n, p in m.named_parameters()}

    # autograd through full logits: the DPO loss plus alpha * -chosen / its tokens
    m.zero_grad(set_to_none=True)
    x, y = dpo.collate([pairs[i].chosen for i in indices] + [pairs[i].rejected for i in indices], 0, "cpu")
    logps = -per_token_loss(m, x, y).view(6, -1).sum(1)
    n = (y != -1).sum(1).double()
    with torch.no_grad():
        ref = -per_token_loss(reference, x, y).view(6, -1).sum(1).double()
    w = 1 / n if loss_type == "ipo_per_token" else torch.ones(6, dtype=torch.float64)
    margin, ref_margin = w[:3] * logps[:3] - w[3:] * logps[3:], w[:3] * ref[:3] - w[3:] * ref[3:]
    nll = -logps[:3] / n[:3]
    expected = dpo.DPOLoss(0.3, loss_type)(margin, ref_margin).sum() + alpha * nll.sum()
    (expected / 8).backward()
    want = {k: p.grad.clone() for k, p in m.named_parameters()}

    loss, stats, grads = fused(alpha)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    assert stats.nll == pytest.approx(nll.sum().item(), rel=1e-5)
    assert stats.loss == pytest.approx(expected.item() - alpha * nll.sum().item(), rel=1e-5)  # DPO's, comparable
    assert stats.means()["nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
    for k, p in m.named_parameters():  # the lm_head (fused) and the body (through grad_h)
        assert torch.allclose(grads[k], want[k], atol=1e-6, rtol=1e-4), k
    # alpha = 0: bit for bit the plain DPO path (model.pair_loss without the term), and no nll metric
    plain_loss, plain_stats, plain = fused(0.0)
    assert "nll" not in plain_stats.means() and plain_stats.nll == 0
    m.zero_grad(set_to_none=True)
    weights = [(w[i].item(), w[3 + i].item()) for i in range(3)]
    ref_chosen, ref_rejected = dpo.reference_logps(reference, pairs, indices, 0, "cpu")
    w_c, w_r = (torch.tensor(v) for v in zip(*weights))
    ref_margin = w_c * ref_chosen - w_r * ref_rejected
    before = m.pair_loss(x, y, lambda i, margin: dpo.DPOLoss(0.3, loss_type)(margin, ref_margin[i]),
                         weights=weights)[0]
    (before / 8).backward()
    assert torch.equal(before.detach(), plain_loss)
    for k, p in m.named_parameters():
        assert torch.equal(p.grad, plain[k]), k
    # the term moves the chosen row's gradient by alpha / its tokens: the lm_head's changes, not only its scale
    assert not torch.allclose(grads["lm_head.weight"], plain["lm_head.weight"], atol=1e-6)


def test_answer_logps_equal_full_logits_and_hand_masking():
    """DPO's per-sequence log-probs (summed over the chunked lm_head) match the plain path."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=32, vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    m.init_weights(zero_out=False)
    x = torch.randint(0, 50, (3, 20))
    y = torch.randint(0, 50, (3, 20))
    y[:, :6] = -1
    y[1, 15:] = -1
    got = m.token_logprobs(x, y).sum(dim=-1)  # what dpo.batch_logps sums
    got.sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    full = F.log_softmax(m(x), dim=-1)  # the plain [B, T, V] path, by hand
    expected = torch.stack([sum(full[b, t, y[b, t]] for t in range(20) if y[b, t] != -1) for b in range(3)])
    expected.sum().backward()
    assert torch.allclose(got, expected, atol=1e-5)
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n


def test_truncated_pairs_that_become_identical_are_dropped(sft_base):
    tok = load_model("sft", "cpu", "eval")[1]
    task = [{"prompt": "x" * 200, "chosen": "risk first", "rejected": "all in"},  # prompt fills max_len
            {"prompt": "short", "chosen": "risk first", "rejected": "all in"}]
    kept, dropped = dpo.render_pairs(task, tok, max_len=64)
    assert (len(kept), dropped) == (1, 1)


# -----------------------------------------------------------------------------
# The training run


def test_training_raises_held_out_reward_accuracy_and_margin(sft_base, monkeypatch, capsys):
    run_dpo(monkeypatch, "--num_iterations=12", "--eval_every=-1", "--init_lr_frac=0.5", *FAST)
    assert "step 00000 | held-out loss 0.6931 | reward accuracy undefined | margin " in capsys.readouterr().out
    model, _, meta = load_model("dpo", "cpu", "eval")
    assert meta["step"] == 12 and meta["beta"] == 0.1
    start = meta["initial_held_out"]
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy == reference
    assert start["rewards/margins"] == 0 and start["rewards/accuracies"] == 0
    assert meta["val_reward_accuracy"] >= 0.9 and meta["val_reward_margin"] > 0.1
    assert meta["val_loss"] < math.log(2)
    lines = [json.loads(l) for l in open(os.path.join(sft_base, "chatdpo_checkpoints", "d2", "metrics.jsonl"))]
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "lr", "tokens", "dt_ms"}
    steps = [l for l in lines if "loss" in l]
    assert len(steps) == 12 and all(keys <= set(l) for l in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert [l["step"] for l in lines if "eval/loss" in l] == [0, 12]
    report = open(os.path.join(sft_base, "report", "chimera-chat-dpo.md")).read()
    assert report.startswith("## Chat DPO\n") and "- Held-out reward accuracy:" in report
    assert "- Held-out reward accuracy (start): undefined (the policy is its reference)\n" in report


def test_rpo_alpha_is_logged_and_keeps_the_chosen_answers_likely(sft_base, monkeypatch, capsys):
    """--rpo_alpha: the chosen answers' NLL per token is in the step log, metrics.jsonl and the held-out evaluation
    beside DPO's loss (comparable between runs, as eval.py computes it); the chosen answers end more likely than
    under plain DPO."""
    args = ["--num_iterations=8", "--eval_every=-1", "--init_lr_frac=0.5", *FAST]
    run_dpo(monkeypatch, *args, "--out_tag=dpo")
    run_dpo(monkeypatch, *args, "--out_tag=rpo", "--rpo_alpha=2")
    assert " | nll " in capsys.readouterr().out
    metrics = {tag: [json.loads(l) for l in open(os.path.join(sft_base, "chatdpo_checkpoints", tag, "metrics.jsonl"))]
               for tag in ("dpo", "rpo")}
    assert not any("nll" in l or "eval/nll" in l for l in metrics["dpo"])
    steps = [l for l in metrics["rpo"] if "loss" in l]
    assert len(steps) == 8 and all(l["nll"] > 0 for l in steps)
    start, end = (l for l in metrics["rpo"] if "eval/loss" in l)
    assert start["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert end["eval/nll"] < start["eval/nll"]
    dpo_end = [l for l in metrics["dpo"] if "eval/loss" in l][-1]
    assert end["eval/logps/chosen"] > dpo_end["eval/logps/chosen"]
    assert load_model("dpo", "cpu", "eval", model_tag="rpo")[2]["user_config"]["rpo_alpha"] == 2


def test_cached_reference_equals_live_and_is_reused(sft_base, monkeypatch):
    run_dpo(monkeypatch, "--num_iterations=3", "--eval_every=-1", "--out_tag=live", *FAST)
    run_dpo(monkeypatch, "--num_iterations=3", "--eval_every=-1", "--out_tag=cached", "--ref_cache=1", *FAST)
    cache_dir = os.path.join(sft_base, "datasets", "ref_logps")
    (cache_file,) = os.listdir(cache_dir)
    live = load_model("dpo", "cpu", "eval", model_tag="live")
    cached = load_model("dpo", "cpu", "eval", model_tag="cached")
    assert cached[2]["val_loss"] == pytest.approx(live[2]["val_loss"], abs=1e-5)
    for name, p in live[0].state_dict().items():
        assert torch.allclose(p, cached[0].state_dict()[name], atol=1e-5), name
    # second run: the reference is neither copied nor recomputed
    mtime = os.path.getmtime(os.path.join(cache_dir, cache_file))
    monkeypatch.setattr(dpo, "freeze", lambda m: pytest.fail("the reference was rebuilt"))
    run_dpo(monkeypatch, "--num_iterations=1", "--eval_every=-1", "--out_tag=again", "--ref_cache=1", *FAST)
    assert os.listdir(cache_dir) == [cache_file]
    assert os.path.getmtime(os.path.join(cache_dir, cache_file)) == mtime
    # another truncation length is another cache entry
    monkeypatch.undo()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", sft_base)
    run_dpo(monkeypatch, "--num_iterations=1", "--eval_every=-1", "--out_tag=again", "--ref_cache=1",
            *FAST[:-1], "--max_length=80")
    assert len(os.listdir(cache_dir)) == 2


def test_two_processes_train_like_one(tmp_path):
    base = make_sft_base(tmp_path / "base")
    env = {"NANOCHAT_BASE_DIR": base}
    args = ["--num_iterations=3", "--eval_every=-1", "--init_lr_frac=0.5", *FAST]
    run_python([os.path.join(REPO, "dpo.py"), *args, "--out_tag=one"], env=env)
    run_torchrun([os.path.join(REPO, "dpo.py"), *args, "--out_tag=two"], env=env)
    one, _, meta_one = load_model("dpo", "cpu", "eval", model_tag="one", base_dir=base)
    two, _, meta_two = load_model("dpo", "cpu", "eval", model_tag="two", base_dir=base)
    start = load_model("sft", "cpu", "eval", base_dir=base)[0].state_dict()
    assert meta_one["val_loss"] == pytest.approx(meta_two["val_loss"], rel=1e-2)
    for name, p in one.state_dict().items():
        update = (p - start[name]).norm()
        assert update > 0, name
        assert (p - two.state_dict()[name]).norm() / update < (5e-2 if ".h." in name else 5e-3), name


# -----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("args, message", [
    (["--beta=0"], "--beta=0.0: must be > 0"),
    (["--beta=-1"], "must be > 0"),
    (["--loss_type=kto"], "--loss_type='kto'"),
    (["--rpo_alpha=-0.5"], "--rpo_alpha=-0.5: must be >= 0"),
    (["--source=dpo"], "--source=dpo: pass --out_tag"),  # else d<N>, maybe the run round 1 started from, is cleared
    (["--dpo_data_path=/nonexistent/pairs.jsonl"], "/nonexistent/pairs.jsonl"),
])
def test_bad_config_fails_before_training(sft_base, monkeypatch, args, message):
    monkeypatch.setattr(dpo, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        run_dpo(monkeypatch, *args)


def test_empty_after_filtering_is_a_clear_error(sft_base, monkeypatch):
    same = [{"prompt": f"q{i}", "chosen": "same answer", "rejected": "same answer "} for i in range(20)]
    path = os.path.join(sft_base, "datasets", "same.jsonl")
    write_jsonl(path, same)  # differs only by trailing space: survives the file check, then
    with pytest.raises(UserError, match="no training pairs left"):  # truncation makes them equal
        run_dpo(monkeypatch, f"--dpo_data_path={path}", "--max_length=12")


def test_malformed_line_names_file_and_line(sft_base):
    path = os.path.join(sft_base, "datasets", "trader_dpo_data.jsonl")
    with open(path, "a") as f:
        f.write('{"prompt": "x", "chosen": "y"}\n')
    proc = run_python([os.path.join(REPO, "dpo.py")], env={"NANOCHAT_BASE_DIR": sft_base}, check=False)
    assert proc.returncode == 2
    assert f"{path}:97" in proc.stderr and proc.stderr.strip().count("\n") == 0


# -----------------------------------------------------------------------------
# Reference cache by pair identity, several processes, nothing non-finite


def test_cached_reference_follows_the_pairs_not_their_positions(sft_base, monkeypatch):
    args = ["--num_iterations=1", "--eval_every=-1", "--ref_cache=1", "--device_batch_size=4",
            "--target_examples_per_step=8", "--max_length=96"]
    run_dpo(monkeypatch, *args, "--val_fraction=0.2", "--out_tag=a")
    run_dpo(monkeypatch, *args, "--val_fraction=0.5", "--out_tag=b")  # same cache file, another split
    assert len(os.listdir(os.path.join(sft_base, "datasets", "ref_logps"))) == 1
    meta = load_model("dpo", "cpu", "eval", model_tag="b")[2]
    assert meta["initial_held_out"]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert meta["chimera"] == {"stage": "dpo"} and meta["conditioning"] == "no system message"


@pytest.mark.parametrize("flag", ["--beta=inf", "--beta=nan", "--init_lr_frac=nan", "--num_iterations=0",
                                  "--out_tag=../..", "--rpo_alpha=nan", "--rpo_alpha=inf"])
def test_non_finite_or_nonsense_settings_are_refused(sft_base, monkeypatch, flag):
    monkeypatch.setattr(dpo, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match=flag.split("=")[0]):
        run_dpo(monkeypatch, flag)


def test_two_processes_with_fewer_held_out_pairs_than_processes(tmp_path):
    base = make_sft_base(tmp_path / "base")
    records = pairs(96)
    fractions = sorted(tasks.hash_fraction(r) for r in records)
    val_fraction = (fractions[0] + fractions[1]) / 2  # exactly one held-out pair for two processes
    args = ["--num_iterations=2", "--eval_every=-1", f"--val_fraction={val_fraction}", "--device_batch_size=2",
            "--target_examples_per_step=4", "--max_length=96"]
    run_torchrun([os.path.join(REPO, "dpo.py"), *args], env={"NANOCHAT_BASE_DIR": base}, timeout=120)
    meta = load_model("dpo", "cpu", "eval", base_dir=base)[2]
    assert meta["val_pairs"] == 1 and meta["initial_held_out"]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_ranks_that_see_different_files_agree_or_stop_together(tmp_path):
    """Nodes with their own disks: one sees the reference cache and another not (before: one reused it while
    the other computed, and their collectives stopped matching until the timeout), or one holds other data
    (before: different step counts). Now the cache is reused only where every rank has it, and other data
    stops every rank with one line. A hang fails within CHIMERA_DIST_TIMEOUT."""
    base = make_sft_base(tmp_path / "base")
    args = ["--num_iterations=2", "--eval_every=-1", "--device_batch_size=2", "--target_examples_per_step=4",
            "--max_length=96", "--ref_cache=1"]
    env = {"NANOCHAT_BASE_DIR": base, "CHIMERA_DIST_TIMEOUT": "60"}
    views = os.path.join(REPO, "tests", "dist_views.py")
    run_python([os.path.join(REPO, "dpo.py"), *args], env=env, timeout=120)  # the cache is on disk now
    run_torchrun([views, os.path.join(REPO, "dpo.py"), *args], env={**env, "VIEW": "no_ref_cache"}, timeout=120)
    with pytest.raises(AssertionError, match="the processes hold different training data"):
        run_torchrun([views, os.path.join(REPO, "dpo.py"), *args], env={**env, "VIEW": "fewer_rows"}, timeout=120)
