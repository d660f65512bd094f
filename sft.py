"""
Supervised fine-tuning of a nanochat base/mid checkpoint on the trader persona data, the
trader data mixed with SmolTalk, or nanochat's general SFT mixture.

    python sft.py --sft_dataset=trader                        # one process (CPU, MPS or 1 GPU)
    torchrun --standalone --nproc_per_node=8 sft.py --sft_dataset=trader_mix --sft_mix_trader=1 --sft_mix_smoltalk=1

Reads $NANOCHAT_BASE_DIR/{mid,base}_checkpoints, writes
$NANOCHAT_BASE_DIR/chatsft_checkpoints/d{depth}/model_{step:06d}.pt + meta + metrics.jsonl,
and the report section report/chat-sft.md.
"""

import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from common import (UserError, MetricsLog, autocast, all_reduce_sum, cleanup_dist, collate, config_dict,
                    get_base_dir, grad_accum_steps, init_dist, linear_decay, master_first, optimizer_step, parse_config,
                    plan_steps, print0, run_main, scale_initial_lr, step_rows, synchronize, write_report_section)
from model import SOURCE_DIRS, load_model, save_checkpoint
import tasks


@dataclass
class Config:
    source: str = ""  # checkpoint to start from: base|mid|sft|...; "" = mid if present, else base
    model_tag: Optional[str] = None  # d<N> directory; None = the largest
    step: Optional[int] = None  # checkpoint step; None = the latest
    device_type: str = ""  # cuda|mps|cpu; "" = autodetect
    sft_dataset: str = "mixture"  # mixture (nanochat's) | trader | trader_mix
    trader_data_path: Optional[str] = None  # SFT JSONL; None = $NANOCHAT_BASE_DIR/datasets/trader_sft_data.jsonl
    trader_val_fraction: float = 0.1  # share of trader conversations held out (by content hash)
    sft_mix_trader: int = 1  # trader_mix: copies of each trader conversation
    sft_mix_smoltalk: int = 1  # trader_mix: copies of each SmolTalk conversation
    smoltalk_rows: int = 10_000  # SmolTalk conversations used by trader_mix and mixture
    val_rows: int = 500  # held-out SmolTalk conversations for the val loss (trader_mix, mixture)
    max_seq_len: int = 0  # truncate conversations to this many tokens; 0 = the model's sequence_len
    device_batch_size: int = 4  # conversations per forward pass per process
    num_epochs: int = 1  # passes over the training rows (when num_iterations is -1)
    num_iterations: int = -1  # optimizer steps; -1 = from num_epochs
    target_examples_per_step: int = 32  # conversations per optimizer step, all processes together
    unembedding_lr: float = 0.004  # AdamW lr of the lm_head
    embedding_lr: float = 0.2  # AdamW lr of the token embedding
    matrix_lr: float = 0.02  # Muon lr of the transformer matrices
    weight_decay: float = 0.0  # AdamW weight decay
    init_lr_frac: float = 0.02  # start every lr at this fraction of the above (nanochat's SFT)
    eval_every: int = 100  # steps between val-loss evaluations (and at the end); -1 = only at the end
    eval_batches: int = 25  # val batches per evaluation, per process
    save_every: int = -1  # steps between checkpoints; -1 = only at the end
    seed: int = 42  # shuffling of the training mixture
    out_tag: Optional[str] = None  # output directory name; None = the source's model tag


DATASETS = ("mixture", "trader", "trader_mix")


def check_config(c):
    """Reject a bad config before anything heavy is loaded."""
    if c.sft_dataset not in DATASETS:
        raise UserError(f"--sft_dataset={c.sft_dataset!r}: expected one of {', '.join(DATASETS)}")
    for key in ("sft_mix_trader", "sft_mix_smoltalk"):
        if getattr(c, key) < 1:
            raise UserError(f"--{key}={getattr(c, key)}: mixture weights are positive integers (copies per row)")
    if not 0.0 <= c.trader_val_fraction < 1.0:
        raise UserError(f"--trader_val_fraction={c.trader_val_fraction}: expected a fraction in [0, 1)")
    for key in ("device_batch_size", "target_examples_per_step", "num_epochs", "eval_batches", "smoltalk_rows"):
        if getattr(c, key) < 1:
            raise UserError(f"--{key}={getattr(c, key)}: must be at least 1")
    if c.source and c.source not in SOURCE_DIRS:
        raise UserError(f"--source={c.source!r}: expected one of {', '.join(SOURCE_DIRS)}")


def default_source():
    """nanochat's SFT starts from the midtrained model; without one, from the base model."""
    mid = os.path.join(get_base_dir(), SOURCE_DIRS["mid"])
    return "mid" if os.path.isdir(mid) and os.listdir(mid) else "base"


# -----------------------------------------------------------------------------
# Data


def build_datasets(c):
    """(train task, {name: val task}) for the chosen dataset mode."""
    if c.sft_dataset == "mixture":  # nanochat's general SFT mixture
        train = tasks.TaskMixture([
            tasks.ARC(subset="ARC-Easy", split="train"),
            tasks.ARC(subset="ARC-Challenge", split="train"),
            tasks.GSM8K(subset="main", split="train"),
            tasks.SmolTalk(split="train", stop=c.smoltalk_rows),
            tasks.IdentityConversations(),
            tasks.SimpleSpelling(size=300, split="train"),
            tasks.SpellingBee(size=300, split="train"),
        ], seed=c.seed)
        return train, {"smoltalk": tasks.SmolTalk(split="test", stop=c.val_rows)}
    trader_train = tasks.TraderSFT(c.trader_data_path, split="train", val_fraction=c.trader_val_fraction)
    trader_val = tasks.TraderSFT(c.trader_data_path, split="val", val_fraction=c.trader_val_fraction)
    if c.sft_dataset == "trader":
        return tasks.TaskMixture([trader_train], seed=c.seed), {"trader": trader_val}
    train = tasks.TaskMixture([trader_train, tasks.SmolTalk(split="train", stop=c.smoltalk_rows)],
                              weights=[c.sft_mix_trader, c.sft_mix_smoltalk], seed=c.seed)
    return train, {"trader": trader_val, "smoltalk": tasks.SmolTalk(split="test", stop=c.val_rows)}


def render_batch(task, indices, tokenizer, max_len, device):
    """Render conversations with their assistant masks and pad them into (inputs, targets)."""
    rows = [tokenizer.render_conversation(task[i], max_tokens=max_len + 1) for i in indices]
    pad = tokenizer.encode_special("<|assistant_end|>")
    return collate(rows, pad, device)


def masked_logprob_sum(model, inputs, targets):
    """Sum of log p over the assistant tokens, and how many there were."""
    return model.token_logprobs(inputs, targets).sum(), int((targets != -1).sum())


@torch.no_grad()
def conversation_loss(model, task, tokenizer, num_rows, batch_size, d, max_len):
    """Mean per-token loss over the assistant tokens of the first num_rows conversations,
    sharded over ranks (eval.py reports the trader held-out loss with it too)."""
    was_training = model.training
    model.eval()
    mine = list(range(d.rank, min(len(task), num_rows), d.world_size))
    total, count = 0.0, 0
    for i in range(0, len(mine), batch_size):
        inputs, targets = render_batch(task, mine[i:i + batch_size], tokenizer, max_len, d.device)
        with autocast(d.device):
            logp, k = masked_logprob_sum(model, inputs, targets)
        total, count = total - logp.item(), count + k
    total, count = all_reduce_sum([total, count], d.device)
    model.train(was_training)
    return total / max(count, 1)


# -----------------------------------------------------------------------------
# Training


def main():
    c = parse_config(Config)
    check_config(c)
    source = c.source or default_source()
    d = init_dist(c.device_type)
    train, vals = master_first(lambda: build_datasets(c))  # data errors surface before the model loads
    if len(train) == 0:
        raise UserError("the training set is empty")
    model, tokenizer, meta = load_model(source, d.device, phase="train", model_tag=c.model_tag, step=c.step)
    max_len = c.max_seq_len or model.config.sequence_len
    accum = grad_accum_steps(c.target_examples_per_step, c.device_batch_size, d.world_size)
    num_iterations = plan_steps(len(train), c.target_examples_per_step, c.num_epochs, c.num_iterations)
    composition = train.composition()
    print0(f"SFT from {source} ({meta.get('model_config')}), dataset {c.sft_dataset}, {d.world_size} process(es)")
    for name, rows, weight, weighted in composition:
        print0(f"  {name:<24} {rows:>7} rows x{weight} = {weighted:>7}")
    print0(f"  {'total':<24} {len(train):>7} rows; {num_iterations} steps of {c.target_examples_per_step} "
           f"({accum} micro-batches of {c.device_batch_size} per process)")

    optimizers = model.setup_optimizers(unembedding_lr=c.unembedding_lr, embedding_lr=c.embedding_lr,
                                        matrix_lr=c.matrix_lr, weight_decay=c.weight_decay)
    scale_initial_lr(optimizers, c.init_lr_frac)
    depth = model.config.n_layer
    out_dir = os.path.join(get_base_dir(), SOURCE_DIRS["sft"], c.out_tag or f"d{depth}")
    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))

    def evaluate(step):
        rows = c.eval_batches * c.device_batch_size * d.world_size
        losses = {name: conversation_loss(model, task, tokenizer, rows, c.device_batch_size, d, max_len)
                  for name, task in vals.items() if len(task)}
        print0(f"step {step:05d} | " + " | ".join(f"val loss ({k}) {v:.4f}" for k, v in losses.items()))
        metrics.log({"step": step, **{f"val_loss/{k}": v for k, v in losses.items()}})
        return losses

    def save(step, val_losses, train_loss):
        if not d.master:
            return
        val_loss = next(iter(val_losses.values()), None)  # trader's when there is trader data
        save_checkpoint(out_dir, step, model.state_dict(), None, {
            "step": step, "val_loss": val_loss, "val_losses": val_losses, "train_loss": train_loss,
            "model_config": meta["model_config"], "user_config": config_dict(c), "source": source,
            "source_step": meta.get("step"), "mixture": [list(row) for row in composition],
        })

    val_losses, train_loss, t_start = {}, float("nan"), time.time()
    for step in range(num_iterations):
        if c.eval_every > 0 and step % c.eval_every == 0:
            val_losses = evaluate(step)
        synchronize(d.device)
        t0 = time.time()
        mine = step_rows(step, c.target_examples_per_step, len(train), d.rank, d.world_size)
        batches = [render_batch(train, mine[i:i + c.device_batch_size], tokenizer, max_len, d.device)
                   for i in range(0, len(mine), c.device_batch_size)]
        # normalise by the step's assistant tokens over all ranks, so N processes take the
        # same step as one process on the same global batch
        (num_tokens,) = all_reduce_sum([sum(int((y != -1).sum()) for _, y in batches)], d.device)
        step_loss = 0.0
        for inputs, targets in batches:
            with autocast(d.device):
                logp, _ = masked_logprob_sum(model, inputs, targets)
            loss = -logp / max(num_tokens, 1)
            loss.backward()
            step_loss += loss.item()
        lrm = linear_decay(step, num_iterations)
        optimizer_step(model, optimizers, lrm)
        synchronize(d.device)
        dt = time.time() - t0
        (train_loss,) = all_reduce_sum([step_loss], d.device)
        eta = (time.time() - t_start) / (step + 1) * (num_iterations - step - 1)
        print0(f"step {step + 1:05d}/{num_iterations:05d} | loss {train_loss:.4f} | lrm {lrm:.3f} | "
               f"tokens {int(num_tokens)} | {num_tokens / dt:,.0f} tok/s | dt {dt * 1000:.0f}ms | ETA {eta:.0f}s")
        metrics.log({"step": step + 1, "loss": train_loss, "lr_multiplier": lrm,
                     "lr": optimizers[1].param_groups[0]["lr"], "tokens": int(num_tokens), "dt_ms": dt * 1000})
        if c.save_every > 0 and (step + 1) % c.save_every == 0 and step + 1 < num_iterations:
            save(step + 1, val_losses, train_loss)

    val_losses = evaluate(num_iterations)
    save(num_iterations, val_losses, train_loss)
    print0(f"saved {out_dir}/model_{num_iterations:06d}.pt")
    write_report_section("Chat SFT", [config_dict(c), {
        "Source": source, "Dataset": c.sft_dataset,
        "Mixture": ", ".join(f"{n} {w}x{r}" for n, r, w, _ in composition),
        "Training rows": len(train), "Number of iterations": num_iterations,
        "Training loss": train_loss,
        **{f"Validation loss ({k})": v for k, v in val_losses.items()},
        "Validation loss": next(iter(val_losses.values()), float("nan")),
        "Training time (s)": round(time.time() - t_start, 1),
    }])
    cleanup_dist()


if __name__ == "__main__":
    run_main(main)
