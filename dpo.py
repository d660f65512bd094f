"""
Direct Preference Optimization of an SFT checkpoint against a frozen copy of itself, on
the Master (chosen) / Apprentice (rejected) pairs that gen.py writes.

    python dpo.py                                   # one process (CPU, MPS or 1 GPU)
    torchrun --standalone --nproc_per_node=8 dpo.py --beta=0.1
    torchrun --standalone --nproc_per_node=8 dpo.py --ref_cache=1   # reference log-probs once, to disk

Reads $NANOCHAT_BASE_DIR/chatsft_checkpoints and datasets/trader_dpo_data.jsonl, writes
$NANOCHAT_BASE_DIR/chatdpo_checkpoints/d{depth}/model_{step:06d}.pt + meta + metrics.jsonl
and the report section report/chat-dpo.md.

The loss (Rafailov et al., 2023): with r = beta * (log pi(y|x) - log pi_ref(y|x)) summed over
the answer's tokens, loss = -log sigmoid(r_chosen - r_rejected); `ipo` (Azar et al., 2023)
regresses the log-ratio margin to 1/(2 beta) instead; label smoothing is the conservative
DPO of Mitchell (2023).
"""

import copy
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from common import (UserError, MetricsLog, all_reduce_sum, atomic_write, autocast, cleanup_dist, collate, config_dict,
                    get_base_dir, grad_accum_steps, init_dist, linear_decay, optimizer_step, parse_config,
                    plan_steps, print0, run_main, scale_initial_lr, step_rows, synchronize, write_report_section)
from model import SOURCE_DIRS, checkpoint_dir_for, find_last_step, load_model, save_checkpoint
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
    weight_decay: float = 0.0  # AdamW weight decay
    init_lr_frac: float = 0.01  # DPO moves gently: every lr starts at this fraction, then decays to 0
    eval_every: int = 50  # steps between held-out evaluations (and at the end); -1 = only at the end
    save_every: int = -1  # steps between checkpoints; -1 = only at the end
    out_tag: Optional[str] = None  # output directory name; None = the source's model tag


LOSS_TYPES = ("sigmoid", "ipo")


def check_config(c):
    if not c.beta > 0:
        raise UserError(f"--beta={c.beta}: must be > 0")
    if c.loss_type not in LOSS_TYPES:
        raise UserError(f"--loss_type={c.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= c.label_smoothing < 0.5:
        raise UserError(f"--label_smoothing={c.label_smoothing}: expected a value in [0, 0.5)")
    if c.label_smoothing and c.loss_type != "sigmoid":
        raise UserError("--label_smoothing only applies to --loss_type=sigmoid")
    if not 0.0 <= c.val_fraction < 1.0:
        raise UserError(f"--val_fraction={c.val_fraction}: expected a fraction in [0, 1)")
    for key in ("max_length", "device_batch_size", "target_examples_per_step", "num_epochs"):
        if getattr(c, key) < 1:
            raise UserError(f"--{key}={getattr(c, key)}: must be at least 1")


# -----------------------------------------------------------------------------
# The loss and the log-probs: small pure functions, importable


def sequence_logps(model, inputs, targets):
    """[B] sum of log p(target) over the positions whose target is not -1, through the
    chunked log-prob path (the full [B, T, V] float32 logits never exist)."""
    return model.token_logprobs(inputs, targets).sum(dim=-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid",
             label_smoothing=0.0):
    """Per-pair losses and the implicit rewards beta * (log pi - log pi_ref)."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


# -----------------------------------------------------------------------------
# Data: each pair becomes two rendered conversations sharing the prompt


def render_pairs(task, tokenizer, max_len):
    """[(chosen (ids, mask), rejected (ids, mask))] for every pair still a real preference
    after truncation, and how many were dropped."""
    kept, dropped = [], 0
    for i in range(len(task)):
        pair = task[i]
        rendered = []
        for answer in (pair["chosen"], pair["rejected"]):
            conversation = {"messages": [{"role": "user", "content": pair["prompt"]},
                                         {"role": "assistant", "content": answer}]}
            rendered.append(tokenizer.render_conversation(conversation, max_tokens=max_len + 1))
        (c_ids, c_mask), (r_ids, r_mask) = rendered
        # the shifted mask (what collate turns into targets) decides what is scored
        if c_ids == r_ids or not any(c_mask[1:]) or not any(r_mask[1:]):
            dropped += 1
            continue
        kept.append((rendered[0], rendered[1]))
    return kept, dropped


def pair_batch(pairs, indices, pad_id, device):
    """One concatenated batch: the chosen conversations, then the rejected ones."""
    rows = [pairs[i][0] for i in indices] + [pairs[i][1] for i in indices]
    return collate(rows, pad_id, device)


def batch_logps(model, pairs, indices, pad_id, device):
    """(chosen logps [B], rejected logps [B], non-pad tokens) in one forward pass."""
    inputs, targets = pair_batch(pairs, indices, pad_id, device)
    with autocast(device):
        logps = sequence_logps(model, inputs, targets)
    n = len(indices)
    tokens = sum(len(pairs[i][0][0]) + len(pairs[i][1][0]) for i in indices)
    return logps[:n], logps[n:], tokens


# -----------------------------------------------------------------------------
# Reference log-probs: live from a frozen copy, or computed once and cached to disk


def freeze(model):
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def reference_logps(ref, pairs, pad_id, batch_size, d):
    """[N, 2] (chosen, rejected) reference log-probs for all pairs, sharded over ranks."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    mine = list(range(d.rank, len(pairs), d.world_size))
    for i in range(0, len(mine), batch_size):
        idx = mine[i:i + batch_size]
        chosen, rejected, _ = batch_logps(ref, pairs, idx, pad_id, d.device)
        out[idx, 0], out[idx, 1] = chosen.double().cpu(), rejected.double().cpu()
    if d.world_size > 1:
        import torch.distributed as dist
        flat = out.to(d.device) if d.device.type == "cuda" else out
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # each pair was filled by exactly one rank
        out = flat.cpu()
    return out


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ref_cache_path(data_path, checkpoint_dir, step, max_len):
    """Cache file beside the data, named by what the log-probs depend on: the reference
    weights (content hash), the data file (content hash) and the truncation length."""
    weights = file_sha256(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"))
    key = hashlib.sha256(f"{weights}:{file_sha256(data_path)}:{max_len}".encode()).hexdigest()[:16]
    return os.path.join(os.path.dirname(os.path.abspath(data_path)), "ref_logps", f"{os.path.basename(data_path)}.{key}.pt")


def load_or_compute_ref_cache(path, policy, pairs, pad_id, c, d):
    if os.path.exists(path):
        cached = torch.load(path, weights_only=True)
        if cached.shape == (len(pairs), 2):
            print0(f"reference log-probs: reusing {path}")
            return cached
    print0(f"reference log-probs: computing {len(pairs)} pairs once -> {path}")
    ref = freeze(policy)
    logps = reference_logps(ref, pairs, pad_id, c.device_batch_size, d)
    del ref
    if d.master:
        atomic_write(path, lambda f: torch.save(logps, f), binary=True)
    return logps


# -----------------------------------------------------------------------------
# Training and evaluation


def pair_stats(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected):
    """Sums over the pairs of a batch, to be reduced over micro-batches and ranks."""
    return {
        "loss": losses.detach().sum().item(),
        "rewards/chosen": chosen_rewards.sum().item(),
        "rewards/rejected": rejected_rewards.sum().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum().item(),
        "logps/chosen": policy_chosen.detach().sum().item(),
        "logps/rejected": policy_rejected.detach().sum().item(),
    }


def reduce_stats(stat_list, count, device):
    keys = list(stat_list[0].keys()) if stat_list else []
    totals = all_reduce_sum([sum(s[k] for s in stat_list) for k in keys] + [count], device)
    n = max(totals[-1], 1)
    return {k: v / n for k, v in zip(keys, totals[:-1])}


class Reference:
    """Where reference log-probs come from: a frozen model (live) or the cached table."""

    def __init__(self, model=None, table=None):
        self.model, self.table = model, table

    def logps(self, pairs_offset, pairs, indices, pad_id, device):
        if self.table is not None:
            rows = self.table[[pairs_offset + i for i in indices]].to(device=device, dtype=torch.float32)
            return rows[:, 0], rows[:, 1]
        with torch.no_grad():
            chosen, rejected, _ = batch_logps(self.model, pairs, indices, pad_id, device)
        return chosen, rejected


@torch.no_grad()
def evaluate(model, reference, val_pairs, val_offset, pad_id, c, d):
    """Held-out DPO loss, reward accuracy and margin."""
    model.eval()
    mine = list(range(d.rank, len(val_pairs), d.world_size))
    stats = []
    for i in range(0, len(mine), c.device_batch_size):
        idx = mine[i:i + c.device_batch_size]
        pc, pr, _ = batch_logps(model, val_pairs, idx, pad_id, d.device)
        rc, rr = reference.logps(val_offset, val_pairs, idx, pad_id, d.device)
        stats.append(pair_stats(*dpo_loss(pc, pr, rc, rr, c.beta, c.loss_type, c.label_smoothing), pc, pr))
    model.train()
    return reduce_stats(stats, len(mine), d.device)


def load_pairs(data_path, c, tokenizer, max_len):
    train_task = tasks.TraderDPO(data_path, split="train", val_fraction=c.val_fraction)
    val_task = tasks.TraderDPO(data_path, split="val", val_fraction=c.val_fraction)
    train, dropped_train = render_pairs(train_task, tokenizer, max_len)
    val, dropped_val = render_pairs(val_task, tokenizer, max_len)
    if not train:
        raise UserError(f"no training pairs left after filtering ({dropped_train} dropped as identical or "
                        f"empty after truncation to {max_len} tokens)")
    return train, val, dropped_train + dropped_val


def main():
    c = parse_config(Config)
    check_config(c)
    d = init_dist(c.device_type)
    data_path = c.dpo_data_path or os.path.join(get_base_dir(), "datasets", "trader_dpo_data.jsonl")
    tasks.TraderDPO(data_path, split="train", val_fraction=c.val_fraction)  # bad data fails before the model loads
    model, tokenizer, meta = load_model(c.source, d.device, phase="train", model_tag=c.model_tag, step=c.step)
    max_len = min(c.max_length, model.config.sequence_len)
    train, val, dropped = load_pairs(data_path, c, tokenizer, max_len)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    accum = grad_accum_steps(c.target_examples_per_step, c.device_batch_size, d.world_size, what="pairs")
    num_iterations = plan_steps(len(train), c.target_examples_per_step, c.num_epochs, c.num_iterations)
    print0(f"DPO on {c.source} step {meta.get('step')}: {len(train)} train / {len(val)} held-out pairs "
           f"({dropped} dropped), beta {c.beta}, {c.loss_type}, {num_iterations} steps of "
           f"{c.target_examples_per_step} pairs ({accum} micro-batches of {c.device_batch_size} per process)")

    if c.ref_cache:
        checkpoint_dir = checkpoint_dir_for(c.source, c.model_tag)
        step = c.step if c.step is not None else find_last_step(checkpoint_dir)
        path = ref_cache_path(data_path, checkpoint_dir, step, max_len)
        reference = Reference(table=load_or_compute_ref_cache(path, model, train + val, pad_id, c, d))
    else:
        reference = Reference(model=freeze(model))
    val_offset = len(train)  # the cached table holds train pairs, then held-out pairs

    optimizers = model.setup_optimizers(unembedding_lr=c.unembedding_lr, embedding_lr=c.embedding_lr,
                                        matrix_lr=c.matrix_lr, weight_decay=c.weight_decay)
    scale_initial_lr(optimizers, c.init_lr_frac)
    out_dir = os.path.join(get_base_dir(), SOURCE_DIRS["dpo"], c.out_tag or f"d{model.config.n_layer}")
    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))

    def run_eval(step):
        if not val:
            return {}
        held_out = evaluate(model, reference, val, val_offset, pad_id, c, d)
        print0(f"step {step:05d} | held-out loss {held_out['loss']:.4f} | reward accuracy "
               f"{held_out['rewards/accuracies']:.3f} | margin {held_out['rewards/margins']:.4f}")
        metrics.log({"step": step, **{f"eval/{k}": v for k, v in held_out.items()}})
        return held_out

    def save(step, held_out):
        if d.master:
            save_checkpoint(out_dir, step, model.state_dict(), None, {
                "step": step, "model_config": meta["model_config"], "user_config": config_dict(c),
                "beta": c.beta, "loss_type": c.loss_type, "source": c.source, "source_step": meta.get("step"),
                "train_pairs": len(train), "val_pairs": len(val), "dropped_pairs": dropped,
                "val_loss": held_out.get("loss"), "val_reward_accuracy": held_out.get("rewards/accuracies"),
                "val_reward_margin": held_out.get("rewards/margins"), "initial_held_out": initial,
            })

    initial = run_eval(0)
    held_out, t_start = initial, time.time()
    for step in range(num_iterations):
        if step > 0 and c.eval_every > 0 and step % c.eval_every == 0:
            held_out = run_eval(step)
        synchronize(d.device)
        t0 = time.time()
        mine = step_rows(step, c.target_examples_per_step, len(train), d.rank, d.world_size)
        stats, tokens = [], 0
        for i in range(0, len(mine), c.device_batch_size):
            idx = mine[i:i + c.device_batch_size]
            pc, pr, n_tokens = batch_logps(model, train, idx, pad_id, d.device)
            rc, rr = reference.logps(0, train, idx, pad_id, d.device)
            losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, c.beta, c.loss_type, c.label_smoothing)
            # a fixed number of pairs per step: divide by it and N processes match one
            (losses.sum() / c.target_examples_per_step).backward()
            stats.append(pair_stats(losses, chosen_r, rejected_r, pc, pr))
            tokens += n_tokens
        lrm = linear_decay(step, num_iterations)
        optimizer_step(model, optimizers, lrm)
        synchronize(d.device)
        dt = time.time() - t0
        logged = reduce_stats(stats, len(mine), d.device)
        (tokens,) = all_reduce_sum([tokens], d.device)
        eta = (time.time() - t_start) / (step + 1) * (num_iterations - step - 1)
        print0(f"step {step + 1:05d}/{num_iterations:05d} | loss {logged['loss']:.4f} | acc "
               f"{logged['rewards/accuracies']:.2f} | margin {logged['rewards/margins']:.3f} | "
               f"{tokens / dt:,.0f} tok/s | dt {dt * 1000:.0f}ms | ETA {eta:.0f}s")
        metrics.log({"step": step + 1, **logged, "lr": optimizers[1].param_groups[0]["lr"],
                     "lr_multiplier": lrm, "tokens": int(tokens), "dt_ms": dt * 1000})
        if c.save_every > 0 and (step + 1) % c.save_every == 0 and step + 1 < num_iterations:
            save(step + 1, held_out)

    held_out = run_eval(num_iterations)
    save(num_iterations, held_out)
    print0(f"saved {out_dir}/model_{num_iterations:06d}.pt")
    write_report_section("Chat DPO", [config_dict(c), {
        "Source": f"{c.source} step {meta.get('step')}", "Training pairs": len(train), "Held-out pairs": len(val),
        "Dropped pairs": dropped, "Number of iterations": num_iterations, "Beta": c.beta, "Loss type": c.loss_type,
        "Reference": "cached" if c.ref_cache else "live",
        "Held-out loss (start)": initial.get("loss", float("nan")),
        "Held-out loss": held_out.get("loss", float("nan")),
        "Held-out reward accuracy (start)": initial.get("rewards/accuracies", float("nan")),
        "Held-out reward accuracy": held_out.get("rewards/accuracies", float("nan")),
        "Held-out reward margin": held_out.get("rewards/margins", float("nan")),
        "Training time (s)": round(time.time() - t_start, 1),
    }])
    cleanup_dist()


if __name__ == "__main__":
    run_main(main)
