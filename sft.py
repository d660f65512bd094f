"""
Supervised fine-tuning of a nanochat base/mid checkpoint on the trader persona data, the
trader data mixed with SmolTalk, or nanochat's general SFT mixture.

    python sft.py --sft_dataset=trader                        # one process (CPU, MPS or 1 GPU)
    torchrun --standalone --nproc_per_node=8 sft.py --sft_dataset=trader_mix --sft_mix_trader=1 --sft_mix_smoltalk=1

Reads $NANOCHAT_BASE_DIR/{mid,base}_checkpoints, writes
$NANOCHAT_BASE_DIR/chatsft_checkpoints/chimera_d{depth}/model_{step:06d}.pt + meta + metrics.jsonl
(nanochat's own SFT keeps chatsft_checkpoints/d{depth}) and the report section report/chimera-chat-sft.md.
Settings left at -1 and `mixture` follow the SFT of the checkpoint's nanochat generation (885a4f2, 92d63d4).
"""

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
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
    recipe: int = 0  # whose nanochat SFT the -1 settings and `mixture` follow: 2025 | 2026; 0 = the checkpoint's
    sft_dataset: str = "mixture"  # mixture (nanochat's, of the recipe) | trader | trader_mix
    trader_data_path: Optional[str] = None  # SFT JSONL; None = $NANOCHAT_BASE_DIR/datasets/trader_sft_data.jsonl
    trader_val_fraction: float = 0.1  # share of trader conversations held out (by content hash)
    system_prompt_frac: float = 0.2  # share of trader conversations that keep their system message (by content hash)
    sft_mix_trader: int = 1  # trader_mix: copies of each trader conversation
    sft_mix_smoltalk: int = 1  # trader_mix: copies of each SmolTalk conversation
    smoltalk_rows: int = 10_000  # SmolTalk conversations used by trader_mix and 2025's mixture (2026's takes all)
    val_rows: int = 500  # held-out SmolTalk conversations for the val loss (trader_mix, mixture)
    max_seq_len: int = 0  # truncate conversations to this many tokens; 0 = the model's sequence_len (as both recipes)
    device_batch_size: int = -1  # conversations per forward pass per process; -1 = 4 (2025) / the base's (2026)
    num_epochs: int = 1  # passes over the training rows (when num_iterations is -1)
    num_iterations: int = -1  # optimizer steps; -1 = from num_epochs
    target_examples_per_step: int = -1  # conversations a step, all processes; -1 = 32 / the base's tokens a step
    unembedding_lr: float = -1.0  # AdamW lr of the lm_head; -1 = 0.004 (2025) / the base's (2026)
    embedding_lr: float = -1.0  # AdamW lr of the token embedding; -1 = 0.2 (2025) / the base's (2026)
    matrix_lr: float = -1.0  # Muon lr of the transformer matrices; -1 = 0.02 (2025) / the base's (2026)
    weight_decay: float = -1.0  # Muon's (2026) or AdamW's (2025); -1 = 0, or the 2026 base's shards' when continued
    init_lr_frac: float = -1.0  # every lr is this fraction of the above; -1 = 0.02 (2025) / 0.8 (2026)
    warmdown_ratio: float = -1.0  # the last share of steps where lr falls to 0; -1 = 1 (2025: all) / 0.5 (2026)
    eval_every: int = 100  # steps between val-loss evaluations (and at the end); -1 = only at the end
    eval_batches: int = 25  # val batches per evaluation, per process
    save_every: int = -1  # steps between checkpoints; -1 = only at the end
    seed: int = 42  # shuffling of the training mixture
    load_optimizer: bool = True  # continue from the start's nanochat 2026 optimizer shards where it has them
    compile: Optional[bool] = None  # torch.compile the model (lengths symbolic: no recompiles); None = on for CUDA
    out_tag: Optional[str] = None  # output directory name; None = chimera_d{depth}

NOV_2025 = dict(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, device_batch_size=4,  # 885a4f2's SFT
                target_examples_per_step=32, init_lr_frac=0.02, warmdown_ratio=1.0, weight_decay=0.0)

def check_config(config):  # before anything heavy is loaded; a -1 (the recipe's) passes as valid
    given = replace(config, **{k: 1 for k in NOV_2025 if getattr(config, k) == -1})
    check_settings(given, at_least_1=("sft_mix_trader", "sft_mix_smoltalk", "device_batch_size",
                                      "target_examples_per_step", "num_epochs", "eval_batches", "smoltalk_rows"),
                   steps=("num_iterations",), tags=("model_tag", "out_tag"), positive=("init_lr_frac",),
                   not_negative=("max_seq_len", "unembedding_lr", "embedding_lr", "matrix_lr", "weight_decay",
                                 "warmdown_ratio"), at_most={"warmdown_ratio": 1},
                   one_of={"sft_dataset": ("mixture", "trader", "trader_mix"), "recipe": (0, 2025, 2026),
                           "source": ("", *SOURCE_DIRS)})
    if not (0.0 <= config.trader_val_fraction < 1.0 and 0.0 <= config.system_prompt_frac <= 1.0):
        raise UserError(f"--trader_val_fraction={config.trader_val_fraction} must be in [0, 1) and "
                        f"--system_prompt_frac={config.system_prompt_frac} in [0, 1]")

# The recipe: the SFT of the checkpoint's nanochat generation, unless --recipe names the other
def checkpoint_generation(checkpoint_dir, step):
    """2026 if the checkpoint's meta has a window_pattern (as model.py decides), else 2025: read before the weights
    load, so that data problems show first (an unreadable meta counts as 2025 here; load_model then says why)."""
    with contextlib.suppress(OSError, ValueError, LookupError, TypeError, RecursionError):
        with open(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"), encoding="utf-8") as f:
            return 2026 if "window_pattern" in json.load(f)["model_config"] else 2025
    return 2025

def follow_recipe(config, recipe, meta, lengths, world_size):
    """config with each -1 setting the recipe's: 885a4f2's, or 92d63d4's, which inherits the rates and batch of the
    start's meta (the pretraining's; its fallbacks where that has none). Its batch is total_batch_size tokens:
    here as many conversations of the rows' mean length, in whole micro-batches."""
    pretrain = meta.get("user_config") or {}
    inherit = lambda where, key, fallback: fallback if where.get(key) is None else where[key]
    settings = NOV_2025 if recipe == 2025 else dict(
        init_lr_frac=0.8, warmdown_ratio=0.5, weight_decay=0.0,
        device_batch_size=inherit(meta, "device_batch_size", 32),
        unembedding_lr=inherit(pretrain, "unembedding_lr", 0.004), embedding_lr=inherit(pretrain, "embedding_lr", 0.3),
        matrix_lr=inherit(pretrain, "matrix_lr", 0.02))
    if config.device_batch_size == -1 and config.target_examples_per_step > 0:  # micro-batches that fill a given step
        fits = [d for d in range(1, settings["device_batch_size"] + 1)
                if config.target_examples_per_step % (d * world_size) == 0]
        settings = {**settings, "device_batch_size": max(fits, default=settings["device_batch_size"])}
    config = replace(config, recipe=recipe, **{k: v for k, v in settings.items() if getattr(config, k) == -1})
    if config.target_examples_per_step == -1:
        per_pass = config.device_batch_size * world_size
        per_step = inherit(meta, "total_batch_size", 524288) * len(lengths) / sum(lengths) / per_pass
        config = replace(config, target_examples_per_step=per_pass * max(1, round(per_step)))
    return config

# Data
def build_datasets(config, recipe):
    """(train mixture, {name: val task}) for the chosen dataset mode; `mixture` is the recipe's nanochat SFT's."""
    if config.sft_dataset == "mixture":
        if recipe == 2026:  # 92d63d4's: all of SmolTalk (in nanochat's order), MMLU's auxiliary_train x3, GSM8K x4
            parts, weights = [tasks.SmolTalkShuffled("train"), tasks.MMLU("all", "auxiliary_train"),
                              tasks.GSM8K("main", "train")], [1, 3, 4]
        else:  # 885a4f2's
            parts, weights = [tasks.ARC("ARC-Easy", "train"), tasks.ARC("ARC-Challenge", "train"),
                              tasks.GSM8K("main", "train"), tasks.SmolTalkShuffled("train", stop=config.smoltalk_rows),
                              tasks.IdentityConversations(), tasks.SimpleSpelling(300, "train"),
                              tasks.SpellingBee(300, "train")], None
        return (tasks.TaskMixture(parts, weights, seed=config.seed),
                {"smoltalk": tasks.SmolTalk("test", stop=config.val_rows)})
    trader_train, trader_val = (tasks.TraderSFT(config.trader_data_path, split, config.trader_val_fraction)
                                for split in ("train", "val"))
    if config.sft_dataset == "trader":
        return tasks.TaskMixture([trader_train], seed=config.seed), {"trader": trader_val}
    train = tasks.TaskMixture([trader_train, tasks.SmolTalk("train", stop=config.smoltalk_rows)],
                              weights=[config.sft_mix_trader, config.sft_mix_smoltalk], seed=config.seed)
    return train, {"trader": trader_val, "smoltalk": tasks.SmolTalk("test", stop=config.val_rows)}

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
    start_dir = checkpoint_dir_for(source, config.model_tag)
    latest = find_last_step(start_dir)  # a missing checkpoint is found before any download
    recipe = config.recipe or checkpoint_generation(start_dir, latest if config.step is None else config.step)
    train, vals = tasks.download_lock(lambda: build_datasets(config, recipe))  # data errors surface before the model
    model, tokenizer, meta = load_model(source, proc.device, "train", config.model_tag, config.step)
    max_len = min(config.max_seq_len or model.config.sequence_len, model.config.sequence_len)
    rendered = [render(task, tokenizer, max_len, config.system_prompt_frac) for task in train.tasks]
    rows = [rendered[t][i] for t, i in train.index_map if rendered[t][i] is not None]  # the mixture's order
    dropped = sum(r.count(None) for r in rendered)
    if not rows:
        raise UserError(f"no training conversation has an assistant token within {max_len} tokens (--max_seq_len)"
                        + f"; all {dropped} have nothing to learn" * bool(dropped))
    lengths, pad_id = [len(ids) for ids, _ in rows], tokenizer.encode_special("<|assistant_end|>")
    decay_given = config.weight_decay != -1  # else a warm start takes the shards' (nanochat 92d63d4's)
    config = follow_recipe(config, recipe, meta, lengths, proc.world_size)
    schedule = Schedule(lengths, config.target_examples_per_step, config.device_batch_size, proc.world_size,
                        config.num_epochs, config.num_iterations)
    steps, composition = schedule.num_iterations, train.composition()
    print0(f"SFT from {source} ({meta.get('model_config')}), dataset {config.sft_dataset}, nanochat {recipe}'s recipe, "
           f"{proc.world_size} process(es)\n"
           + "".join(f"  {name:<24} {n:>7} rows x{w} = {nw:>7}\n" for name, n, w, nw in composition)
           + f"  {len(rows)} rows ({dropped} dropped: nothing to learn within {max_len} tokens); {steps} steps of "
           f"{config.target_examples_per_step} in micro-batches of {config.device_batch_size} per process; lrs "
           f"{config.unembedding_lr}, {config.embedding_lr}, {config.matrix_lr} x {config.init_lr_frac}")
    compile_model(model, config.compile)
    optimizers = setup_optimizers(model, config.unembedding_lr, config.embedding_lr, config.matrix_lr,
                                  config.weight_decay)
    if config.load_optimizer and (shards := load_optimizer_shards(start_dir, meta.get("step", -1))):
        warm_start(optimizers, shards, start_dir, keep=("weight_decay",) * decay_given)  # as nanochat 2026's chat_sft
        config = replace(config, weight_decay=optimizers[1].param_groups[0]["weight_decay"])  # as used
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
            "dropped_rows": dropped, "system_prompt_frac": config.system_prompt_frac,
            "init_lr_frac": config.init_lr_frac, "warmdown_ratio": config.warmdown_ratio,
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
        lrm = schedule.lr_multiplier(step, config.warmdown_ratio)
        for group in optimizers[1].param_groups if recipe == 2026 else ():  # 92d63d4 warms Muon's momentum up
            group["momentum"] = (1 - min(step / 300, 1)) * 0.85 + min(step / 300, 1) * 0.95
        optimizer_step(model, optimizers, config.init_lr_frac * lrm, grad_sync)
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
        "LR schedule": f"{config.init_lr_frac} x the lrs, down to 0 over the last {config.warmdown_ratio:.0%} "
                       "of the steps",
        "Training time (s)": round(time.time() - step_log.start, 1)}])
    cleanup_dist()

if __name__ == "__main__":
    run_main(main)
