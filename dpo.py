"""
Direct Preference Optimization of an SFT checkpoint against a frozen copy of itself, on
the Master (chosen) / Apprentice (rejected) pairs that gen.py writes.

    python dpo.py                                   # one process (CPU, MPS or 1 GPU)
    torchrun --standalone --nproc_per_node=8 dpo.py --beta=0.1
    torchrun --standalone --nproc_per_node=8 dpo.py --ref_cache=1   # reference log-probs once, to disk

Reads $NANOCHAT_BASE_DIR/chatsft_checkpoints and datasets/trader_dpo_data.jsonl, writes
$NANOCHAT_BASE_DIR/chatdpo_checkpoints/d{depth}/model_{step:06d}.pt + meta + metrics.jsonl and the report section
report/chimera-chat-dpo.md.

The loss (Rafailov et al., 2023): with r = beta * (log pi(y|x) - log pi_ref(y|x)) summed over the answer's tokens,
loss = -log sigmoid(r_chosen - r_rejected); `ipo` (Azar et al., 2023) regresses the log-ratio margin of the summed
log-probs to 1/(2 beta); `ipo_per_token` is TRL's IPO, on log-probs averaged over each answer's tokens (TRL's beta
values transfer to it, not to `ipo`); label smoothing is the conservative DPO of Mitchell (2023), TRL's "sigmoid"
with label_smoothing (not the "robust" loss TRL >= 0.29 names so).
"""

import copy
import hashlib
import math
import os
import re
import time
from collections import namedtuple
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from common import (UserError, all_reduce_sum, atomic_write, autocast, check_settings, cleanup_dist, get_base_dir,
                    init_dist, parse_config, print0, rank0_value, run_main)
from checkpoint import RunDir, checkpoint_dir_for, find_last_step, load_model
from dataloader import Schedule, StepLog, collate, due
from model import compile_model
from optim import GradSync, optimizer_step, setup_optimizers
from report import write_report_section
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
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo (on summed log-probs) | ipo_per_token (TRL's, on token means)
    label_smoothing: float = 0.0  # sigmoid only, conservative DPO: the assumed rate of flipped preference labels
    # RPO (Pang et al. 2024): + alpha * the chosen answer's NLL per token, per pair as the paper (length-normalised);
    # TRL's rpo_alpha takes one token mean over a micro-batch's chosen answers (equal when the lengths are)
    rpo_alpha: float = 0.0
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

def check_config(config):
    check_settings(config, at_least_1=("max_length", "device_batch_size", "target_examples_per_step", "num_epochs"),
                   positive=("beta", "init_lr_frac"), steps=("num_iterations",), tags=("model_tag", "out_tag"),
                   not_negative=("unembedding_lr", "embedding_lr", "matrix_lr", "weight_decay", "rpo_alpha"),
                   one_of={"loss_type": ("sigmoid", "ipo", "ipo_per_token")})
    if not 0.0 <= config.label_smoothing < 0.5 or (config.label_smoothing and config.loss_type != "sigmoid"):
        raise UserError(f"--label_smoothing={config.label_smoothing}: expected a value in [0, 0.5), and only with "
                        "--loss_type=sigmoid")
    if not 0.0 <= config.val_fraction < 1.0:
        raise UserError(f"--val_fraction={config.val_fraction}: expected a fraction in [0, 1)")
    if config.source == "dpo" and not config.out_tag:  # its default d<N> may be the DPO run that round 1 started from
        raise UserError("--source=dpo: pass --out_tag, a directory of its own (run.sh's rounds use d<N>_r<k>)")

# The loss (a small pure function of a pair's margin), and the pairs: two rendered conversations sharing the prompt
class DPOLoss(NamedTuple):
    """Per-pair losses from the policy's margin log pi(chosen) - log pi(rejected) and the reference's:
    every variant sees the policy only through that margin."""
    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0  # weight of the chosen answers' NLL per token (RPO; not a function of the margin)

    def __call__(self, margin, ref_margin):
        logits, beta, smoothing = margin - ref_margin, self.beta, self.label_smoothing
        if self.loss_type == "sigmoid":
            return -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing
        return (logits - 1 / (2 * beta)) ** 2

Pair = namedtuple("Pair", "chosen rejected digest")  # rendered (ids, mask) each; the record's digest (the cache's key)

def render_pairs(task, tokenizer, max_len):
    """[Pair] for every pair still a real preference after truncation, and how many were dropped.
    The pairs are rendered as a user talks to the model, without a system message (the chat condition)."""
    kept = []
    for pair in task:
        rendered = [tokenizer.render_conversation({"messages": [{"role": "user", "content": pair["prompt"]},
                                                                {"role": "assistant", "content": pair[answer]}]},
                                                  max_tokens=max_len + 1) for answer in ("chosen", "rejected")]
        (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = rendered
        # the shifted mask (what collate turns into targets) decides what is scored
        if chosen_ids != rejected_ids and any(chosen_mask[1:]) and any(rejected_mask[1:]):
            chosen, rejected = ((torch.tensor(ids, dtype=torch.int32), torch.tensor(mask)) for ids, mask in rendered)
            kept.append(Pair(chosen, rejected, tasks.record_digest(pair).hex()))
    return kept, len(task) - len(kept)

# [B] log-probs of the chosen and the rejected answers (sums over their tokens), the tokens (padding left out)
# and positions (padding included) computed, and the sum of pair_loss over the pairs (None without one)
PairLogps = namedtuple("PairLogps", "chosen rejected real_tokens positions loss")

def batch_logps(model, pairs, indices, pad_id, device, pair_loss=None, weights=None, chosen_coefs=None):
    """PairLogps of pairs[indices], in one forward pass over the chosen conversations, then the rejected ones.
    With pair_loss(i, w_c chosen_i - w_r rejected_i), its sum's gradient (+ chosen_coefs[i] chosen_i) is taken in the
    forward pass (model.pair_loss; weights [(w_c, w_r)] per pair, default 1)."""
    rows = [pairs[i].chosen for i in indices] + [pairs[i].rejected for i in indices]
    inputs, targets = collate(rows, pad_id, device)
    real_tokens, positions = sum(len(ids) - 1 for ids, _ in rows), inputs.numel()
    with autocast(device):
        if pair_loss is not None:
            loss, chosen, rejected = model.pair_loss(inputs, targets, pair_loss, weights=weights,
                                                     chosen_coefs=chosen_coefs)
            return PairLogps(chosen, rejected, real_tokens, positions, loss)
        logps = model.token_logprobs(inputs, targets).sum(dim=-1)
    return PairLogps(logps[:len(indices)], logps[len(indices):], real_tokens, positions, None)

def my_batches(pairs, batch_size, proc):
    """This rank's share of all pairs in batches of similar length (little padding)."""
    order = sorted(range(len(pairs)), key=lambda i: max(len(pairs[i].chosen[0]), len(pairs[i].rejected[0])))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)][proc.rank::proc.world_size]

# Reference log-probs: live from a frozen model, or computed once and cached to disk
def freeze(model):
    """The frozen reference: a copy without gradients. On CUDA its matrices are bf16, as autocast hands the policy's
    to its matmuls; the token embedding and scalars stay float32 as the policy's, so a Nov 2025 reference scores
    exactly as the policy (a whole bf16 copy drifted ~0.3 nats a 200-token sequence: rewards not 0 at step 0).
    2026's value embeddings are bf16 too (half its weights at d32, 4 GB a rank): about half that drift remains."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    for module in reference.modules() if model.get_device().type == "cuda" else ():
        if isinstance(module, torch.nn.Linear) or module is reference.value_embeds:
            module.to(torch.bfloat16)
    return reference

@torch.no_grad()  # in place: no logits kept for a backward that never comes
def reference_logps(reference, pairs, indices, pad_id, device):
    """(chosen, rejected) log-probs of pairs[indices] by the reference: a frozen model, or a reference_table."""
    if isinstance(reference, dict):
        return torch.stack([reference[pairs[i].digest] for i in indices]).to(device, torch.float32).unbind(1)
    return batch_logps(reference, pairs, indices, pad_id, device)[:2]  # chosen, rejected

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

@torch.no_grad()
def reference_table(data_path, max_len, policy, pairs, pad_id, config, proc):
    """{pair digest: (chosen, rejected) reference log-probs}, computed once and cached beside the data in a file
    named by everything they depend on: the reference weights, the tokenizer, the data (content hashes), the
    truncation and the rendering. Looked up by the pair, not its position: any split or order reads the right ones."""
    def key():
        checkpoint_dir = checkpoint_dir_for(config.source, config.model_tag)
        step = find_last_step(checkpoint_dir) if config.step is None else config.step
        parts = [file_sha256(os.path.join(checkpoint_dir, f"model_{step:06d}.pt")), file_sha256(data_path),
                 str(max_len), file_sha256(os.path.join(get_base_dir(), "tokenizer", "tokenizer.pkl")),
                 "user+assistant, no system"]
        return hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]

    tag = rank0_value(key() if proc.master else None)  # one rank reads the weights (11 GB at d32), not all
    folder, name = os.path.split(os.path.abspath(data_path))
    path = os.path.join(folder, "ref_logps", f"{name}.{tag}.pt")
    cached = torch.load(path, weights_only=True) if os.path.exists(path) else {"keys": [], "logps": []}
    table = dict(zip(cached["keys"], cached["logps"]))
    # reused only where every rank has it (one node's disk may hold the file and another's not: their
    # collectives would stop matching); written by each node's first rank
    if not all_reduce_sum([not all(pair.digest in table for pair in pairs)])[0]:
        print0(f"reference log-probs: reusing {path}")
        return table
    print0(f"reference log-probs: computing {len(pairs)} pairs once -> {path}")
    logps = torch.zeros(len(pairs), 2, dtype=torch.float64)  # the policy is the reference now; float64 on the CPU
    for indices in my_batches(pairs, config.device_batch_size, proc):  # each rank its share, then summed over ranks
        logps[indices] = torch.stack(reference_logps(policy, pairs, indices, pad_id, proc.device), dim=1).cpu().double()
    logps = torch.tensor(all_reduce_sum(logps.view(-1).tolist(), proc.device), dtype=torch.float64).view(-1, 2)
    keys = [pair.digest for pair in pairs]
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        atomic_write(path, lambda f: torch.save({"keys": keys, "logps": logps}, f), binary=True)
    return dict(zip(keys, logps))

# Training and evaluation
class Stats(NamedTuple):
    """Sums over pairs, added up over micro-batches, then over ranks in one reduce of the fields in order
    (so a rank with no pairs still takes part); means() is what is logged."""
    loss: float = 0.0
    chosen_reward: float = 0.0  # beta * (log pi - log pi_ref) of the chosen answer
    rejected_reward: float = 0.0
    margin: float = 0.0  # chosen_reward - rejected_reward
    correct: float = 0.0  # pairs whose margin is positive
    chosen_logp: float = 0.0
    rejected_logp: float = 0.0
    nll: float = 0.0  # the chosen answer's NLL per token, with --rpo_alpha (trained on: loss + alpha * nll)
    pairs: int = 0
    real_tokens: int = 0
    positions: int = 0

    def __add__(self, other):
        return Stats(*(a + b for a, b in zip(self, other)))

    def means(self):
        n = max(self.pairs, 1)
        return {"loss": self.loss / n, "rewards/chosen": self.chosen_reward / n, "rewards/rejected":
                self.rejected_reward / n, "rewards/margins": self.margin / n, "rewards/accuracies": self.correct / n,
                "logps/chosen": self.chosen_logp / n, "logps/rejected": self.rejected_logp / n,
                **({"nll": self.nll / n} if self.nll else {})}

def pair_losses(model, reference, pairs, indices, pad_id, dpo_loss, device):
    """A batch's summed loss (its gradient taken in the forward pass; None where grad is disabled) and its Stats."""
    ref_chosen, ref_rejected = reference_logps(reference, pairs, indices, pad_id, device)
    # the loss's margins: of sums, or of per-token means (1 / each answer's scored tokens)
    tokens = [(int(pairs[i].chosen[1][1:].sum()), int(pairs[i].rejected[1][1:].sum())) for i in indices]
    weights = [(1 / c, 1 / r) if dpo_loss.loss_type == "ipo_per_token" else (1, 1) for c, r in tokens]
    w_c, w_r = (torch.tensor(w, device=ref_chosen.device) for w in zip(*weights))
    ref_margin = w_c * ref_chosen - w_r * ref_rejected
    pair_loss = lambda i, margin: dpo_loss(margin, ref_margin[i])
    # RPO's alpha * NLL per token, -alpha * chosen / its tokens, is linear in chosen: model.pair_loss adds its gradient
    alpha = dpo_loss.rpo_alpha
    coefs = [-alpha / c for c, _ in tokens] if alpha else None
    logps = batch_logps(model, pairs, indices, pad_id, device, pair_loss if torch.is_grad_enabled() else None, weights,
                        coefs)
    losses = dpo_loss(w_c * logps.chosen - w_r * logps.rejected, ref_margin)
    nll = -logps.chosen / torch.tensor([c for c, _ in tokens], device=device) if alpha else torch.zeros_like(losses)
    chosen, rejected = dpo_loss.beta * (logps.chosen - ref_chosen), dpo_loss.beta * (logps.rejected - ref_rejected)
    margins = chosen - rejected
    sums = torch.stack([losses, chosen, rejected, margins, (margins > 0).float(), logps.chosen, logps.rejected, nll])
    sums = sums.detach().cpu().double().sum(dim=1).tolist()  # float64 on the CPU: MPS has none
    return logps.loss, Stats(*sums, pairs=len(indices), real_tokens=logps.real_tokens, positions=logps.positions)

@torch.no_grad()
def evaluate_pairs(model, reference, pairs, pad_id, dpo_loss, batch_size, proc):
    """Stats.means() over all ranks' pairs (reference: a frozen model or a reference_table); keeps the model's mode."""
    was_training, stats = model.training, Stats()
    model.eval()
    for indices in my_batches(pairs, batch_size, proc):
        stats += pair_losses(model, reference, pairs, indices, pad_id, dpo_loss, proc.device)[1]
    model.train(was_training)
    return Stats(*all_reduce_sum(stats, proc.device)).means()

def main():
    config = parse_config(Config)
    check_config(config)
    proc = init_dist(config.device_type)
    # bad data fails before the model loads
    splits = [tasks.TraderDPO(config.dpo_data_path, split, config.val_fraction) for split in ("train", "val")]
    model, tokenizer, meta = load_model(config.source, proc.device, "train", config.model_tag, config.step)
    max_len = min(config.max_length, model.config.sequence_len)
    (train, dropped), (val, dropped_val) = (render_pairs(task, tokenizer, max_len) for task in splits)
    if not train:
        raise UserError(f"no training pairs left after filtering ({dropped} dropped as identical or "
                        f"empty after truncation to {max_len} tokens)")
    dropped += dropped_val
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    schedule = Schedule([max(len(pair.chosen[0]), len(pair.rejected[0])) for pair in train],
                        config.target_examples_per_step, config.device_batch_size, proc.world_size, config.num_epochs,
                        config.num_iterations)
    steps = schedule.num_iterations
    print0(f"DPO on {config.source} step {meta.get('step')}: {len(train)} train / {len(val)} held-out pairs "
           f"({dropped} dropped), beta {config.beta}, {config.loss_type}, {steps} steps of "
           f"{config.target_examples_per_step} pairs")
    if config.ref_cache:  # the reference's log-probs computed once, looked up by pair digest
        reference = reference_table(splits[0].path, max_len, model, train + val, pad_id, config, proc)
    else:  # a frozen copy: no grads, so its passes build no graph
        reference = freeze(model)
        compile_model(reference, config.compile)
    compile_model(model, config.compile)
    optimizers = setup_optimizers(model, config.unembedding_lr, config.embedding_lr, config.matrix_lr,
                                  config.weight_decay)
    grad_sync = GradSync(model, owners=optimizers[1].owners())
    run_dir = RunDir("dpo", config.out_tag or f"d{model.config.n_layer}", proc.master,
                     (config.source, config.model_tag))
    step_log = StepLog(run_dir, steps)
    dpo_loss = DPOLoss(config.beta, config.loss_type, config.label_smoothing, config.rpo_alpha)

    def evaluate(step):
        if not val:
            return {}
        held_out = evaluate_pairs(model, reference, val, pad_id, dpo_loss, config.device_batch_size, proc)
        accuracy = "undefined" if step == 0 else f"{held_out['rewards/accuracies']:.3f}"  # 0: every margin is ~0
        print0(f"step {step:05d} | held-out loss {held_out['loss']:.4f} | reward accuracy {accuracy} | margin "
               f"{held_out['rewards/margins']:.4f}")
        run_dir.log({"step": step, **{f"eval/{k}": v for k, v in held_out.items()}})
        return held_out

    def save(step, initial, held_out):
        run_dir.save(step, model, {
            "step": step, "model_config": meta["model_config"], "user_config": asdict(config), "beta": config.beta,
            "loss_type": config.loss_type, "source": config.source, "source_step": meta.get("step"),
            "train_pairs": len(train), "val_pairs": len(val), "dropped_pairs": dropped,
            "conditioning": "no system message", "val_loss": held_out.get("loss"),
            "val_reward_accuracy": held_out.get("rewards/accuracies"),
            "val_reward_margin": held_out.get("rewards/margins"), "initial_held_out": initial,
            "real_token_frac": step_log.real_token_frac()})

    initial = held_out = {}
    for step in range(steps + 1):  # evaluate and save at the top of a step; the last one does only that
        last = step == steps
        if last or step == 0 or due(step, config.eval_every):  # always at 0: the meta and the report show the start
            held_out = evaluate(step)
            initial = held_out if step == 0 else initial
        if last or (step and due(step, config.save_every)):
            save(step, initial, held_out)
        if last:
            break
        t0 = time.time()  # the device is idle: the last step ended with a synchronize, evaluation with a reduce
        micro, stats = schedule.micro_batches(step, proc.rank), Stats()
        for i, indices in enumerate(micro):
            loss, batch_stats = pair_losses(model, reference, train, indices, pad_id, dpo_loss, proc.device)
            if i == len(micro) - 1:
                grad_sync.arm()  # the last backward all-reduces each bucket as soon as it is ready
            # a fixed number of pairs per step: divide by it and N processes match one
            (loss / config.target_examples_per_step).backward()
            stats += batch_stats
        stats = Stats(*all_reduce_sum(stats, proc.device))
        means = stats.means()
        if not math.isfinite(means["loss"]):
            raise UserError(f"step {step + 1}: the DPO loss is {means['loss']}; stopped, nothing saved")
        lrm = schedule.lr_multiplier(step)
        optimizer_step(model, optimizers, config.init_lr_frac * lrm, grad_sync)
        nll = f" | nll {means['nll']:.4f}" if "nll" in means else ""
        step_log.log(step + 1, time.time() - t0, f"loss {means['loss']:.4f} | acc {means['rewards/accuracies']:.2f} | "
                     f"margin {means['rewards/margins']:.3f}{nll}", {**means, "lr": optimizers[1].param_groups[0]["lr"],
                     "lr_multiplier": lrm}, stats.real_tokens, stats.real_tokens, stats.positions)

    round_tag = config.out_tag if re.fullmatch(r".+_r\d+", config.out_tag or "") else None  # on-policy: its own
    write_report_section(f"Chat DPO {round_tag}" if round_tag else "Chat DPO", [asdict(config), {
        "Source": f"{config.source} step {meta.get('step')}", "Training pairs": len(train), "Held-out pairs": len(val),
        "Dropped pairs": dropped, "Number of iterations": steps, "Beta": config.beta, "Loss type": config.loss_type,
        "Reference": "cached" if config.ref_cache else "live", "Conditioning": "no system message (the chat condition)",
        "Real-token fraction": step_log.real_token_frac(),
        **({"Held-out loss (start)": initial["loss"], "Held-out loss": held_out["loss"],
            "Held-out reward accuracy (start)": "undefined (the policy is its reference)", "Held-out reward accuracy":
            held_out["rewards/accuracies"], "Held-out reward margin": held_out["rewards/margins"]} if val else {}),
        "Training time (s)": round(time.time() - step_log.start, 1)}])
    cleanup_dist()

if __name__ == "__main__":
    run_main(main)
