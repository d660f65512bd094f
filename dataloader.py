"""What SFT and DPO share to run their steps: padding conversations into inputs and targets, the schedule
of micro-batches and learning rate, the cadence of evaluations and saves, and the step log."""

import time

import torch

from common import UserError, differs_from_rank0, print0

WINDOW_STEPS = 16  # steps whose rows are sorted by length together (see Schedule)

def collate(rows, pad_id, device):
    """Pad rendered conversations [(ids, mask)] into inputs and targets [B, longest - 1] (-1: not learned)."""
    width = max(len(ids) for ids, _ in rows) - 1
    inputs, targets = (torch.full((len(rows), width), fill, dtype=torch.long) for fill in (pad_id, -1))
    for i, (ids, mask) in enumerate(rows):
        ids, mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.bool)
        inputs[i, :len(ids) - 1] = ids[:-1]
        targets[i, :len(ids) - 1] = ids[1:].masked_fill(~mask[1:], -1)
    return inputs.to(device), targets.to(device)

class Schedule:
    """A run's steps: rows in order, cycling, `per_step` to a step. Each window of WINDOW_STEPS steps
    sorts its rows by length into micro-batches (little padding), shuffled over its steps and dealt
    round-robin to the ranks (the same global batch for any number of processes); lr falls 1 -> 0."""

    def __init__(self, lengths, per_step, batch_size, world_size, num_epochs, num_iterations):
        if per_step % (batch_size * world_size):
            raise UserError(f"--target_examples_per_step={per_step} must be a multiple of device_batch_size"
                            f"*world_size = {batch_size}*{world_size} = {batch_size * world_size}")
        if differs_from_rank0(list(lengths)):  # each rank loaded its own files
            raise UserError("the processes hold different training data (rows other than rank 0's): every node needs "
                            "the same data files, or its steps and collectives would not match")
        self.lengths, self.per_step, self.batch_size, self.world_size = lengths, per_step, batch_size, world_size
        self.num_iterations = num_iterations if num_iterations > 0 else max(1, len(lengths) * num_epochs // per_step)
        self.window, self.cached = max(1, min(WINDOW_STEPS, len(lengths) // per_step)), (None, None)

    def micro_batches(self, step, rank):
        """This rank's micro-batches at `step`, each a list of row indices."""
        w, bs = step // self.window, self.batch_size
        size = min(self.window, self.num_iterations - w * self.window) * self.per_step  # the last: the steps left
        if self.cached[0] != w:
            start = w * self.window * self.per_step
            rows = sorted(((start + i) % len(self.lengths) for i in range(size)), key=self.lengths.__getitem__)
            order = torch.randperm(size // bs, generator=torch.Generator().manual_seed(w)).tolist()
            self.cached = (w, [rows[i * bs:(i + 1) * bs] for i in order])
        per = self.per_step // bs
        return self.cached[1][(step % self.window) * per:][:per][rank::self.world_size]

    def lr_multiplier(self, step, warmdown=1.0):
        """1 until the run's last warmdown share, then linearly to 0 (1.0: from the first step, as nanochat 885a4f2's
        SFT; 0.5: flat, then down over the second half, as 92d63d4's)."""
        progress = step / self.num_iterations
        return 1.0 if progress <= 1 - warmdown else (1 - progress) / warmdown

def due(step, every):
    """Whether an every-N-steps evaluation or save falls on `step` (every = -1: never; the end has its own)."""
    return every > 0 and step % every == 0

class StepLog:
    """Each step's line on stdout and record in metrics.jsonl: the stage's own figures, then the share of
    real tokens (not padding), throughput, time and ETA. Also adds up the run's real-token share."""

    def __init__(self, run_dir, steps):
        self.run_dir, self.steps, self.start, self.real, self.positions = run_dir, steps, time.time(), 0, 0

    def log(self, step, dt, figures, record, tokens, real, positions):
        """Step `step` (1-based) took dt seconds; tokens: what the throughput counts."""
        self.real, self.positions = self.real + real, self.positions + positions
        eta = (time.time() - self.start) / step * (self.steps - step)
        print0(f"step {step:05d}/{self.steps:05d} | {figures} | real {real / positions:.0%} | "
               f"{tokens / dt:,.0f} tok/s | dt {dt * 1000:.0f}ms | ETA {eta:.0f}s")
        self.run_dir.log({"step": step, **record, "tokens": int(tokens), "real_token_frac": real / positions,
                          "dt_ms": dt * 1000})

    def real_token_frac(self):
        return self.real / max(self.positions, 1)
