"""
Direct Preference Optimization of an SFT checkpoint against a frozen copy of itself, on
the Master (chosen) / Apprentice (rejected) pairs that gen.py writes.

    python dpo.py                                   # one process (CPU, MPS or 1 GPU)
    torchrun --standalone --nproc_per_node=8 dpo.py --beta=0.1
    torchrun --standalone --nproc_per_node=8 dpo.py --ref_cache=1   # reference log-probs once, to disk

Reads $NANOCHAT_BASE_DIR/chatsft_checkpoints and datasets/trader_dpo_data.jsonl, writes
$NANOCHAT_BASE_DIR/chatdpo_checkpoints/d{depth}/model_{step:06d}.pt + meta + metrics.jsonl
and the report section report/chimera-chat-dpo.md.

The loss (Rafailov et al., 2023): with r = beta * (log pi(y|x) - log pi_ref(y|x)) summed over
the answer's tokens, loss = -log sigmoid(r_chosen - r_rejected); `ipo` (Azar et al., 2023)
regresses the log-ratio margin to 1/(2 beta) instead; label smoothing is the conservative
DPO of Mitchell (2023).
"""

import copy
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F

from common import (UserError, all_reduce_sum, atomic_write, autocast, check_settings, cleanup_dist, get_base_dir,
                    init_dist, parse_config, print0, run_main, synchronize, write_report_section)
from checkpoint import RunDir, checkpoint_dir_for, find_last_step, load_model
from dataloader import Schedule, collate
from model import compile_model
from optim import GradSync, optimizer_step, setup_optimizers
import tasks


@dataclass
class Config:
    source: str = "sft"  # checkpoint to align (and the frozen reference): sft|mid|base|...
    model_tag: Optional[str] = None  # d<N> directory; None = the largest
    step: Optional[int] = None  # checkpoint step; None = the latest
    device_type: str = ""  # cuda|mps|cpu; "" = autodetect
    dpo_data_path: Optional[str] = None  # pairs JSONL; None = $NANOCHAT_BASE_DIR/datasets/trader_dpo_data.jsonl
    val_fraction: float = 0.05  # share of pairs held out (by content hash)
    beta: float = 0.1  # strength of the pull towards the reference (DPO's beta)
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0  # sigmoid only: assumed rate of flipped preference labels
    max_length: int = 1024  # truncate each conversation to min(this, the model's sequence_len) tokens
    ref_cache: bool = False  # compute reference log-probs once, cache them beside the data, free the reference
    device_batch_size: int = 4  # pairs per forward pass per process (2x conversations)
    num_epochs: int = 1  # passes over the training pairs (when num_iterations is -1)
    num_iterations: int = -1  # optimizer steps; -1 = from num_epochs
    target_examples_per_step: int = 32  # pairs per optimizer step, all processes together
    unembedding_lr: float = 0.004  # AdamW lr of the lm_head (scaled by init_lr_frac)
    embedding_lr: float = 0.2  # AdamW lr of the token embedding (scaled by init_lr_frac)
    matrix_lr: float = 0.02  # Muon lr of the transformer matrices (scaled by init_lr_frac)
    weight_decay: float = 0.0  # weight decay (Muon in 2026 models, AdamW in Nov 2025 ones)
    init_lr_frac: float = 0.01  # DPO moves gently: every lr starts at this fraction, then decays to 0
    eval_every: int = 50  # steps between held-out evaluations (and at the end); -1 = only at the end
    save_every: int = -1  # steps between checkpoints; -1 = only at the end
    compile: Optional[bool] = None  # torch.compile policy and reference (lengths symbolic); None = on for CUDA
    out_tag: Optional[str] = None  # output directory name; None = d{depth}


def check_config(c):
    if c.loss_type not in ("sigmoid", "ipo"):
        raise UserError(f"--loss_type={c.loss_type!r}: expected one of sigmoid, ipo")
    if not 0.0 <= c.label_smoothing < 0.5 or (c.label_smoothing and c.loss_type != "sigmoid"):
        raise UserError(f"--label_smoothing={c.label_smoothing}: expected a value in [0, 0.5), and only with "
                        "--loss_type=sigmoid")
    if not 0.0 <= c.val_fraction < 1.0:
        raise UserError(f"--val_fraction={c.val_fraction}: expected a fraction in [0, 1)")
    check_settings(c, at_least_1=("max_length", "device_batch_size", "target_examples_per_step", "num_epochs"),
                   positive=("beta", "init_lr_frac"), steps=("num_iterations",), tags=("model_tag", "out_tag"),
                   not_negative=("unembedding_lr", "embedding_lr", "matrix_lr", "weight_decay"))


# The loss (a small pure function), and the pairs: two rendered conversations sharing the prompt
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses and the implicit rewards beta * (log pi - log pi_ref)."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def render_pairs(task, tokenizer, max_len):
    """[(chosen (ids, mask), rejected (ids, mask), the pair's digest)] for every pair still a
    real preference after truncation, and how many were dropped. The pairs are rendered as
    a user talks to the model, without a system message (the chat condition)."""
    kept = []
    for pair in task:
        rendered = [tokenizer.render_conversation({"messages": [{"role": "user", "content": pair["prompt"]},
                                                                {"role": "assistant", "content": answer}]},
                                                  max_tokens=max_len + 1) for answer in (pair["chosen"], pair["rejected"])]
        (c_ids, c_mask), (r_ids, r_mask) = rendered
        # the shifted mask (what collate turns into targets) decides what is scored
        if c_ids != r_ids and any(c_mask[1:]) and any(r_mask[1:]):
            chosen, rejected = ((torch.tensor(ids, dtype=torch.int32), torch.tensor(mask)) for ids, mask in rendered)
            kept.append((chosen, rejected, tasks.record_digest(pair).hex()))
    return kept, len(task) - len(kept)


def batch_logps(model, pairs, indices, pad_id, device, pair_loss=None):
    """(chosen logps [B], rejected logps [B], (real tokens, positions computed), loss): sums over the
    answers' tokens, in one forward pass over the chosen conversations, then the rejected ones. With
    pair_loss(i, chosen_i - rejected_i), loss is its sum over the pairs, its gradient taken in the
    forward pass (model.pair_loss); else None."""
    rows = [pairs[i][0] for i in indices] + [pairs[i][1] for i in indices]
    inputs, targets = collate(rows, pad_id, device)
    counts = (sum(len(ids) - 1 for ids, _ in rows), inputs.numel())
    with autocast(device):
        if pair_loss is not None:
            loss, chosen, rejected = model.pair_loss(inputs, targets, pair_loss)
            return chosen, rejected, counts, loss
        logps = model.token_logprobs(inputs, targets).sum(dim=-1)
    return logps[:len(indices)], logps[len(indices):], counts, None


def my_batches(pairs, batch_size, d):
    """This rank's share of all pairs in batches of similar length (little padding)."""
    order = sorted(range(len(pairs)), key=lambda i: max(len(pairs[i][0][0]), len(pairs[i][1][0])))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)][d.rank::d.world_size]


# Reference log-probs: live from a frozen model, or computed once and cached to disk
def freeze(model):
    return copy.deepcopy(model).eval().requires_grad_(False)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def reference_table(data_path, max_len, policy, pairs, pad_id, c, d):
    """{pair digest: (chosen, rejected) reference log-probs}, computed once and cached beside the
    data in a file named by everything they depend on: the reference weights, the tokenizer,
    the data (content hashes), the truncation and the rendering. Looked up by the pair, never by
    its position, so another split or order of the same pairs reads the right values."""
    checkpoint_dir = checkpoint_dir_for(c.source, c.model_tag)
    step = find_last_step(checkpoint_dir) if c.step is None else c.step
    parts = [file_sha256(os.path.join(checkpoint_dir, f"model_{step:06d}.pt")), file_sha256(data_path), str(max_len),
             file_sha256(os.path.join(get_base_dir(), "tokenizer", "tokenizer.pkl")), "user+assistant, no system"]
    tag = hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]
    path = os.path.join(os.path.dirname(os.path.abspath(data_path)), "ref_logps", f"{os.path.basename(data_path)}.{tag}.pt")
    cached = torch.load(path, weights_only=True) if os.path.exists(path) else {"keys": [], "logps": []}
    table = dict(zip(cached["keys"], cached["logps"]))
    if all(key in table for _, _, key in pairs):
        print0(f"reference log-probs: reusing {path}")
        return table
    print0(f"reference log-probs: computing {len(pairs)} pairs once -> {path}")
    logps = torch.zeros(len(pairs), 2, dtype=torch.float64, device=d.device)  # the policy is the reference now
    for idx in my_batches(pairs, c.device_batch_size, d):  # each rank its share, then summed over ranks
        logps[idx] = torch.stack(batch_logps(policy, pairs, idx, pad_id, d.device)[:2], dim=1).double()
    logps = torch.tensor(all_reduce_sum(logps.view(-1).tolist(), d.device), dtype=torch.float64).view(-1, 2)
    keys = [key for _, _, key in pairs]
    if d.master:
        atomic_write(path, lambda f: torch.save({"keys": keys, "logps": logps}, f), binary=True)
    return dict(zip(keys, logps))


# Training and evaluation
STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
         "logps/rejected")


def pair_losses(model, reference, pairs, indices, pad_id, c, d):
    """A batch's summed loss (with its gradient where grad is enabled) and its sums to be added over
    micro-batches and ranks: STATS' in order, then its pairs, real tokens and positions computed."""
    ref_chosen, ref_rejected = reference(pairs, indices)
    loss_fn = partial(dpo_loss, beta=c.beta, loss_type=c.loss_type, label_smoothing=c.label_smoothing)
    grad = torch.is_grad_enabled()
    # DPO's loss sees the policy only through the margin log pi(chosen) - log pi(rejected)
    pair_loss = (lambda i, margin: loss_fn(margin, 0.0, ref_chosen[i], ref_rejected[i])[0]) if grad else None
    pc, pr, counts, loss = batch_logps(model, pairs, indices, pad_id, d.device, pair_loss)
    losses, chosen, rejected = loss_fn(pc, pr, ref_chosen, ref_rejected)
    margins = chosen - rejected
    sums = torch.stack([losses, chosen, rejected, margins, (margins > 0).float(), pc, pr]).detach().double().sum(dim=1)
    return losses.sum() if loss is None else loss, sums.tolist() + [len(indices), *counts]


def reduce_stats(stat_list, device):
    """(means over all ranks' pairs, real tokens, positions): the same reduce on every rank, even one with no pairs."""
    *sums, pairs, real, positions = all_reduce_sum(map(sum, zip([0] * (len(STATS) + 3), *stat_list)), device)
    return {k: v / max(pairs, 1) for k, v in zip(STATS, sums)}, real, positions


@torch.no_grad()
def evaluate(model, reference, val_pairs, pad_id, c, d):
    """Held-out DPO loss, reward accuracy and margin; reference(pairs, indices) gives its log-probs."""
    model.eval()
    stats = [pair_losses(model, reference, val_pairs, idx, pad_id, c, d)[1]
             for idx in my_batches(val_pairs, c.device_batch_size, d)]
    model.train()
    return reduce_stats(stats, d.device)[0]


def main():
    c = parse_config(Config)
    check_config(c)
    d = init_dist(c.device_type)
    # bad data fails before the model loads
    splits = [tasks.TraderDPO(c.dpo_data_path, split=s, val_fraction=c.val_fraction) for s in ("train", "val")]
    model, tokenizer, meta = load_model(c.source, d.device, phase="train", model_tag=c.model_tag, step=c.step)
    max_len = min(c.max_length, model.config.sequence_len)
    (train, dropped), (val, dropped_val) = (render_pairs(task, tokenizer, max_len) for task in splits)
    if not train:
        raise UserError(f"no training pairs left after filtering ({dropped} dropped as identical or "
                        f"empty after truncation to {max_len} tokens)")
    dropped += dropped_val
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    schedule = Schedule([max(len(ch[0]), len(rj[0])) for ch, rj, _ in train], c.target_examples_per_step,
                        c.device_batch_size, d.world_size, c.num_epochs, c.num_iterations)
    steps = schedule.num_iterations
    print0(f"DPO on {c.source} step {meta.get('step')}: {len(train)} train / {len(val)} held-out pairs ({dropped} "
           f"dropped), beta {c.beta}, {c.loss_type}, {steps} steps of {c.target_examples_per_step} pairs")
    ref = None if c.ref_cache else freeze(model)  # a frozen copy: no grads, so its passes build no graph
    if c.ref_cache:  # the reference's log-probs computed once, looked up by pair digest
        table = reference_table(splits[0].path, max_len, model, train + val, pad_id, c, d)
        reference = lambda pairs, idx: torch.stack([table[pairs[i][2]] for i in idx]).to(d.device, torch.float32).unbind(1)
    else:
        reference = lambda pairs, idx: batch_logps(ref, pairs, idx, pad_id, d.device)[:2]
    for m in filter(None, (model, ref)):
        compile_model(m, c.compile)
    optimizers = setup_optimizers(model, c.unembedding_lr, c.embedding_lr, c.matrix_lr, c.weight_decay)
    grad_sync = GradSync(model)
    run = RunDir("dpo", c.out_tag or f"d{model.config.n_layer}", d.master, (c.source, c.model_tag))

    def run_eval(step):
        if not val:
            return {}
        held_out = evaluate(model, reference, val, pad_id, c, d)
        print0(f"step {step:05d} | held-out loss {held_out['loss']:.4f} | reward accuracy "
               f"{held_out['rewards/accuracies']:.3f} | margin {held_out['rewards/margins']:.4f}")
        run.log({"step": step, **{f"eval/{k}": v for k, v in held_out.items()}})
        return held_out

    def save(step, held_out):
        run.save(step, model, {
            "step": step, "model_config": meta["model_config"], "user_config": asdict(c),
            "beta": c.beta, "loss_type": c.loss_type, "source": c.source, "source_step": meta.get("step"),
            "train_pairs": len(train), "val_pairs": len(val), "dropped_pairs": dropped, "conditioning": "no system message",
            "val_loss": held_out.get("loss"), "val_reward_accuracy": held_out.get("rewards/accuracies"),
            "val_reward_margin": held_out.get("rewards/margins"), "initial_held_out": initial,
            "real_token_frac": real_total / max(positions_total, 1)})

    initial = run_eval(0)
    held_out, t_start, real_total, positions_total = initial, time.time(), 0, 0
    for step in range(steps):
        if step > 0 and c.eval_every > 0 and step % c.eval_every == 0:
            held_out = run_eval(step)
        t0 = time.time()  # the device is idle: the last step ended with a synchronize, evaluation with a reduce
        stats, micro, lrm = [], schedule.micro_batches(step, d.rank), schedule.lr_multiplier(step)
        for i, idx in enumerate(micro):
            loss, sums = pair_losses(model, reference, train, idx, pad_id, c, d)
            if i == len(micro) - 1:
                grad_sync.arm()  # the last backward all-reduces each bucket as soon as it is ready
            # a fixed number of pairs per step: divide by it and N processes match one
            (loss / c.target_examples_per_step).backward()
            stats.append(sums)
        logged, real, positions = reduce_stats(stats, d.device)
        if not math.isfinite(logged["loss"]):
            raise UserError(f"step {step + 1}: the DPO loss is {logged['loss']}; stopped, nothing saved")
        optimizer_step(model, optimizers, c.init_lr_frac * lrm, grad_sync)
        synchronize(d.device)
        dt = time.time() - t0
        real_total, positions_total = real_total + real, positions_total + positions
        print0(f"step {step + 1:05d}/{steps:05d} | loss {logged['loss']:.4f} | acc {logged['rewards/accuracies']:.2f} "
               f"| margin {logged['rewards/margins']:.3f} | real {real / positions:.0%} | {real / dt:,.0f} tok/s | "
               f"dt {dt * 1000:.0f}ms | ETA {(time.time() - t_start) / (step + 1) * (steps - step - 1):.0f}s")
        run.log({"step": step + 1, **logged, "lr": optimizers[1].param_groups[0]["lr"], "lr_multiplier": lrm,
                 "tokens": int(real), "real_token_frac": real / positions, "dt_ms": dt * 1000})
        if c.save_every > 0 and (step + 1) % c.save_every == 0 and step + 1 < steps:
            save(step + 1, held_out)

    held_out = run_eval(steps)
    save(steps, held_out)
    print0(f"saved {run.path}/model_{steps:06d}.pt")
    write_report_section("Chat DPO", [asdict(c), {
        "Source": f"{c.source} step {meta.get('step')}", "Training pairs": len(train), "Held-out pairs": len(val),
        "Dropped pairs": dropped, "Number of iterations": steps, "Beta": c.beta, "Loss type": c.loss_type,
        "Reference": "cached" if c.ref_cache else "live", "Conditioning": "no system message (the chat condition)",
        "Real-token fraction": real_total / positions_total,
        **({"Held-out loss (start)": initial["loss"], "Held-out loss": held_out["loss"],
            "Held-out reward accuracy (start)": initial["rewards/accuracies"], "Held-out reward accuracy":
            held_out["rewards/accuracies"], "Held-out reward margin": held_out["rewards/margins"]} if val else {}),
        "Training time (s)": round(time.time() - t_start, 1)}])
    cleanup_dist()


if __name__ == "__main__":
    run_main(main)
