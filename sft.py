"""
Supervised fine-tuning of a nanochat base/mid checkpoint on the trader persona data, the
trader data mixed with SmolTalk, or nanochat's general SFT mixture.

    python sft.py --sft_dataset=trader                        # one process (CPU, MPS or 1 GPU)
    torchrun --standalone --nproc_per_node=8 sft.py --sft_dataset=trader_mix --sft_mix_trader=1 --sft_mix_smoltalk=1

Reads $NANOCHAT_BASE_DIR/{mid,base}_checkpoints, writes
$NANOCHAT_BASE_DIR/chatsft_checkpoints/chimera_d{depth}/model_{step:06d}.pt + meta + metrics.jsonl
(nanochat's own SFT keeps chatsft_checkpoints/d{depth}) and the report section report/chimera-chat-sft.md.
"""

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from common import (UserError, all_reduce_sum, autocast, check_settings, cleanup_dist, get_base_dir, init_dist,
                    parse_config, print0, run_main)
from checkpoint import (SOURCE_DIRS, RunDir, checkpoint_dir_for, default_start, find_last_step, load_model,
                        load_optimizer_shards)
from dataloader import Schedule, StepLog, collate, due
from model import compile_model
from optim import GradSync, optimizer_step, setup_optimizers, warm_start
from report import write_report_section
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
    system_prompt_frac: float = 0.2  # share of trader conversations that keep their system message (by content hash)
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
    weight_decay: float = 0.0  # weight decay (Muon in 2026 models, AdamW in Nov 2025 ones)
    init_lr_frac: float = -1.0  # every lr is this fraction of the above; -1 = the generation's SFT: 0.02 / 0.8 (2026)
    warmdown_ratio: float = -1.0  # the last share of steps where lr falls to 0; -1 = 1 (Nov 2025: all) / 0.5 (2026)
    eval_every: int = 100  # steps between val-loss evaluations (and at the end); -1 = only at the end
    eval_batches: int = 25  # val batches per evaluation, per process
    save_every: int = -1  # steps between checkpoints; -1 = only at the end
    seed: int = 42  # shuffling of the training mixture
    load_optimizer: bool = True  # continue from the start's nanochat 2026 optimizer shards where it has them
    compile: Optional[bool] = None  # torch.compile the model (lengths symbolic: no recompiles); None = on for CUDA
    out_tag: Optional[str] = None  # output directory name; None = chimera_d{depth}


def check_config(config):  # before anything heavy is loaded
    if config.sft_dataset not in ("mixture", "trader", "trader_mix"):
        raise UserError(f"--sft_dataset={config.sft_dataset!r}: expected one of mixture, trader, trader_mix")
    if not (0.0 <= config.trader_val_fraction < 1.0 and 0.0 <= config.system_prompt_frac <= 1.0):
        raise UserError(f"--trader_val_fraction={config.trader_val_fraction} must be in [0, 1) and "
                        f"--system_prompt_frac={config.system_prompt_frac} in [0, 1]")
    check_settings(config, at_least_1=("sft_mix_trader", "sft_mix_smoltalk", "device_batch_size",
                                       "target_examples_per_step", "num_epochs", "eval_batches", "smoltalk_rows"),
                   steps=("num_iterations",), tags=("model_tag", "out_tag"),
                   not_negative=("max_seq_len", "unembedding_lr", "embedding_lr", "matrix_lr", "weight_decay"))
    if config.init_lr_frac != -1 and not config.init_lr_frac > 0:
        raise UserError(f"--init_lr_frac={config.init_lr_frac}: must be > 0, or -1 for the checkpoint generation's")
    if config.warmdown_ratio != -1 and not 0 <= config.warmdown_ratio <= 1:
        raise UserError(f"--warmdown_ratio={config.warmdown_ratio}: must be in [0, 1], or -1 for the generation's")
    if config.source and config.source not in SOURCE_DIRS:
        raise UserError(f"--source={config.source!r}: expected one of {', '.join(SOURCE_DIRS)}")


# Data
def build_datasets(config):
    """(train mixture, {name: val task}) for the chosen dataset mode."""
    if config.sft_dataset == "mixture":  # nanochat's general SFT mixture
        train = tasks.TaskMixture([
            tasks.ARC(subset="ARC-Easy", split="train"),
            tasks.ARC(subset="ARC-Challenge", split="train"),
            tasks.GSM8K(subset="main", split="train"),
            tasks.SmolTalk(split="train", stop=config.smoltalk_rows),
            tasks.IdentityConversations(),
            tasks.SimpleSpelling(size=300, split="train"),
            tasks.SpellingBee(size=300, split="train"),
        ], seed=config.seed)
        return train, {"smoltalk": tasks.SmolTalk(split="test", stop=config.val_rows)}
    trader_train, trader_val = (tasks.TraderSFT(config.trader_data_path, split, config.trader_val_fraction)
                                for split in ("train", "val"))
    if config.sft_dataset == "trader":
        return tasks.TaskMixture([trader_train], seed=config.seed), {"trader": trader_val}
    train = tasks.TaskMixture([trader_train, tasks.SmolTalk(split="train", stop=config.smoltalk_rows)],
                              weights=[config.sft_mix_trader, config.sft_mix_smoltalk], seed=config.seed)
    return train, {"trader": trader_val, "smoltalk": tasks.SmolTalk(split="test", stop=config.val_rows)}


def render(task, tokenizer, max_len, system_prompt_frac=1.0, num_rows=None):
    """(ids, mask) per conversation, truncated to max_len + 1 tokens, or None where no assistant token
    is left to learn (dropped, never trained on as a zero loss). A trader conversation keeps its system
    message with probability system_prompt_frac, by a salted hash of its content (not the split's)."""
    out, trader = [], isinstance(task, tasks.TraderSFT) and system_prompt_frac < 1
    for conversation in (task[i] for i in range(min(len(task), num_rows or len(task)))):
        if trader and tasks.hash_fraction({"system prompt": conversation}) >= system_prompt_frac:
            conversation = dict(conversation, messages=[m for m in conversation["messages"] if m["role"] != "system"])
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=max_len + 1)
        out.append((torch.tensor(ids, dtype=torch.int32), torch.tensor(mask)) if any(mask[1:]) else None)
    return out


@torch.no_grad()
def conversation_loss(model, task, tokenizer, num_rows, batch_size, proc, max_len, system_prompt_frac=1.0):
    """Mean loss per assistant token over the first num_rows conversations (similar lengths batched
    together, batches dealt over ranks); DataUnavailable when truncation leaves no assistant token."""
    rows = sorted(filter(None, render(task, tokenizer, max_len, system_prompt_frac, num_rows)), key=lambda r: len(r[0]))
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for i in range(proc.rank * batch_size, len(rows), batch_size * proc.world_size):
        inputs, targets = collate(rows[i:i + batch_size], tokenizer.encode_special("<|assistant_end|>"), proc.device)
        with autocast(proc.device):
            total -= model.token_logprobs(inputs, targets).sum().item()
        count += int((targets != -1).sum())
    total, count = all_reduce_sum([total, count], proc.device)
    model.train(was_training)
    if count == 0:
        raise tasks.DataUnavailable(f"no assistant token within {max_len} tokens")
    return total / count


# Training
def main():
    config = parse_config(Config)
    check_config(config)
    source = config.source or default_start(get_base_dir())  # as nanochat's SFT: mid if there is one, else base
    proc = init_dist(config.device_type)
    find_last_step(checkpoint_dir_for(source, config.model_tag))  # a missing checkpoint is found before any download
    train, vals = tasks.download_lock(lambda: build_datasets(config))  # data errors surface before the model loads
    model, tokenizer, meta = load_model(source, proc.device, "train", config.model_tag, config.step)
    max_len = min(config.max_seq_len or model.config.sequence_len, model.config.sequence_len)
    rendered = [render(task, tokenizer, max_len, config.system_prompt_frac) for task in train.tasks]
    rows = [rendered[t][i] for t, i in train.index_map if rendered[t][i] is not None]  # the mixture's order
    dropped = sum(r.count(None) for r in rendered)
    if not rows:
        raise UserError(f"no training conversation has an assistant token within {max_len} tokens (--max_seq_len)"
                        + f"; all {dropped} have nothing to learn" * bool(dropped))
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    gen2026 = model.config.generation == 2026  # the recipe of the checkpoint's nanochat: 92d63d4's, else 885a4f2's
    init_lr_frac = config.init_lr_frac if config.init_lr_frac != -1 else 0.8 if gen2026 else 0.02
    warmdown = config.warmdown_ratio if config.warmdown_ratio != -1 else 0.5 if gen2026 else 1.0
    schedule = Schedule([len(ids) for ids, _ in rows], config.target_examples_per_step, config.device_batch_size,
                        proc.world_size, config.num_epochs, config.num_iterations)
    steps = schedule.num_iterations
    composition = train.composition()
    print0(f"SFT from {source} ({meta.get('model_config')}), dataset {config.sft_dataset}, "
           f"{proc.world_size} process(es)\n"
           + "".join(f"  {name:<24} {n:>7} rows x{w} = {nw:>7}\n" for name, n, w, nw in composition)
           + f"  {len(rows)} rows ({dropped} dropped: nothing to learn within {max_len} tokens); {steps} steps of "
           f"{config.target_examples_per_step} in micro-batches of {config.device_batch_size} per process")
    compile_model(model, config.compile)
    optimizers = setup_optimizers(model, config.unembedding_lr, config.embedding_lr, config.matrix_lr,
                                  config.weight_decay)
    start_dir = checkpoint_dir_for(source, config.model_tag)  # nanochat 2026's chat_sft continues base's optimizer
    if config.load_optimizer and (shards := load_optimizer_shards(start_dir, meta.get("step", -1))):
        warm_start(optimizers, shards, start_dir)
        print0(f"optimizer: continuing from {start_dir}'s {len(shards)} shard(s) of step {meta['step']}")
    grad_sync = GradSync(model, owners=optimizers[1].owners())
    run_dir = RunDir("sft", config.out_tag or f"chimera_d{model.config.n_layer}", proc.master,
                     (source, config.model_tag))
    step_log = StepLog(run_dir, steps)

    def evaluate(step):
        val_losses, num_rows = {}, config.eval_batches * config.device_batch_size * proc.world_size
        for name, task in vals.items():
            try:
                val_losses[name] = conversation_loss(model, task, tokenizer, num_rows, config.device_batch_size, proc,
                                                     max_len, config.system_prompt_frac)
            except tasks.DataUnavailable as e:
                print0(f"val loss ({name}) skipped: {e}")
        print0(f"step {step:05d} | " + " | ".join(f"val loss ({k}) {v:.4f}" for k, v in val_losses.items()))
        run_dir.log({"step": step, **{f"val_loss/{k}": v for k, v in val_losses.items()}})
        return val_losses

    def save(step, val_losses, train_loss):
        run_dir.save(step, model, {
            "step": step, "val_loss": next(iter(val_losses.values()), None), "val_losses": val_losses,
            "train_loss": train_loss, "model_config": meta["model_config"], "user_config": asdict(config),
            "source": source, "source_step": meta.get("step"), "mixture": [list(row) for row in composition],
            "dropped_rows": dropped, "system_prompt_frac": config.system_prompt_frac, "init_lr_frac": init_lr_frac,
            "warmdown_ratio": warmdown,
            "real_token_frac": step_log.real_token_frac()})

    val_losses, train_loss = {}, float("nan")
    for step in range(steps + 1):  # evaluate and save at the top of a step; the last one does only that
        last = step == steps
        if last or due(step, config.eval_every):
            val_losses = evaluate(step)
        if last or (step and due(step, config.save_every)):
            save(step, val_losses, train_loss)
        if last:
            break
        t0 = time.time()  # the device is idle: the last step ended with a synchronize, evaluation with a reduce
        micro = [[rows[i] for i in mb] for mb in schedule.micro_batches(step, proc.rank)]
        batches = [collate(mb, pad_id, proc.device) for mb in micro]
        # normalise by the step's assistant tokens on all ranks: N processes step like one on the same batch
        num_tokens, real, positions = all_reduce_sum([sum(int((y != -1).sum()) for _, y in batches),
                                                      sum(len(ids) - 1 for mb in micro for ids, _ in mb),
                                                      sum(x.numel() for x, _ in batches)], proc.device)
        step_loss = 0.0
        for i, (inputs, targets) in enumerate(batches):
            with autocast(proc.device):
                loss = -model.token_logprobs(inputs, targets, reduction="sum") / num_tokens
            if i == len(batches) - 1:
                grad_sync.arm()  # the last backward all-reduces each bucket as soon as it is ready
            loss.backward()
            step_loss += loss.item()
        (train_loss,) = all_reduce_sum([step_loss], proc.device)
        if not math.isfinite(train_loss):
            raise UserError(f"step {step + 1}: the training loss is {train_loss}; stopped, nothing saved")
        lrm = schedule.lr_multiplier(step, warmdown)
        for group in optimizers[1].param_groups if gen2026 else ():  # 92d63d4 warms Muon's momentum up over 300
            group["momentum"] = (1 - min(step / 300, 1)) * 0.85 + min(step / 300, 1) * 0.95
        optimizer_step(model, optimizers, init_lr_frac * lrm, grad_sync)
        step_log.log(step + 1, time.time() - t0, f"loss {train_loss:.4f} | lrm {lrm:.3f} | tokens {int(num_tokens)}",
                     {"loss": train_loss, "lr_multiplier": lrm, "lr": optimizers[1].param_groups[0]["lr"]},
                     num_tokens, real, positions)

    unused = {"trader": ("sft_mix_", "smoltalk_rows", "val_rows"),  # the settings of datasets not used: unreported
              "mixture": ("trader_", "system_prompt_frac", "sft_mix_")}.get(config.sft_dataset, ())
    write_report_section("Chat SFT", [{k: v for k, v in asdict(config).items() if not k.startswith(unused)}, {
        "Source": source, "Dataset": config.sft_dataset,
        "Mixture": ", ".join(f"{n} {w}x{r}" for n, r, w, _ in composition), "Training rows": len(rows),
        "Dropped conversations (nothing to learn)": dropped,
        "System prompt kept (share of trader conversations)": config.system_prompt_frac, "Number of iterations": steps,
        "Real-token fraction": step_log.real_token_frac(), "Training loss": train_loss,
        **{f"Validation loss ({k})": v for k, v in val_losses.items()},
        **({"Validation loss": next(iter(val_losses.values()))} if val_losses else {}),
        "LR schedule": f"{init_lr_frac} x the lrs, down to 0 over the last {warmdown:.0%} of the steps",
        "Training time (s)": round(time.time() - step_log.start, 1)}])
    cleanup_dist()


if __name__ == "__main__":
    run_main(main)
