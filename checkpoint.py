"""
nanochat's checkpoints, both generations: model_{step:06d}.pt + meta_{step:06d}.json (+ optim_*.pt)
in $NANOCHAT_BASE_DIR/<source's directory>/<tag>/; finding, loading (checked against the meta) and
saving them, a stage's run directory, and a fresh offline base (byte-level tokenizer, random model).

    model, tokenizer, meta = load_model("sft", device, phase="eval", model_tag=None, step=None)
    python checkpoint.py start BASE_DIR [mid|base|sft]   # what run.sh asks: SFT's start
"""

import glob
import json
import os
import pickle
import re
import shlex
import sys
from dataclasses import asdict

import torch

from common import UserError, atomic_write, atomic_write_json, get_base_dir
from model import GPT, GPTConfig
from tokenizer import SPECIAL_TOKENS, byte_level_encoding, get_tokenizer

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "dpo": "chatdpo_checkpoints", "rl": "chatrl_checkpoints"}

def save_checkpoint(checkpoint_dir, step, model_data, meta_data):
    """Meta, then model, each through a temp file and a rename: the latest step is found by model
    files, so a save killed midway never looks like a newer whole checkpoint."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    atomic_write_json(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"), meta_data)
    atomic_write(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"), lambda f: torch.save(model_data, f), binary=True)

def missing(path, what="checkpoint directory", pattern=r".+"):
    """The UserError for a path that is not there: it names what its directory holds (the names matching pattern)."""
    parent = os.path.dirname(path)
    names = sorted(n for n in (os.listdir(parent) if os.path.isdir(parent) else []) if re.fullmatch(pattern, n))
    return UserError(f"{path}: no such {what}; {parent} holds " + (", ".join(names) if names else "none"))

def find_largest_model(checkpoints_dir):
    """The default model tag: the largest chimera_d<N>, else the largest d<N>, else the newest; of the largest depth,
    the last on-policy DPO round (d<N>_r<k>: run.sh's rounds, each in its own directory)."""
    if not os.path.isdir(checkpoints_dir):
        raise missing(checkpoints_dir, pattern=r".+_checkpoints")
    tags = [d for d in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, d))]
    if not tags:
        raise UserError(f"{checkpoints_dir}: no model directories in it")
    for pattern in (r"chimera_d(\d+)", r"d(\d+)"):
        depths = [(int(m[1]), int(m[2] or 0), t) for t in tags if (m := re.fullmatch(pattern + r"(?:_r(\d+))?", t))]
        if depths:
            return max(depths)[2]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))

def nanochat_tag(checkpoints_dir):
    """nanochat's default tag there: the largest d<N> with a model file (never Chimera's chimera_d<N>), else None."""
    depths = [(int(m[1]), m[0]) for f in glob.glob(os.path.join(glob.escape(checkpoints_dir), "d*", "model_*.pt"))
              if (m := re.fullmatch(r"d(\d+)", os.path.basename(os.path.dirname(f))))]
    return max(depths)[1] if depths else None

def default_start(base_dir):
    """SFT's start when none is named, as nanochat's: mid if there is one (2025 nanochat), else base (2026 has no
    mid), else a nanochat SFT alone (a chat model pulled from the Hub)."""
    return next((s for s in ("mid", "base", "sft") if nanochat_tag(os.path.join(base_dir, SOURCE_DIRS[s]))), "base")

def find_last_step(checkpoint_dir):
    if not os.path.isdir(checkpoint_dir):
        raise missing(checkpoint_dir)
    steps = [int(m[1]) for name in os.listdir(checkpoint_dir) if (m := re.fullmatch(r"model_(\d+)\.pt", name))]
    if not steps:
        raise UserError(f"{checkpoint_dir}: no model_*.pt checkpoints in it")
    return max(steps)

BF16_DEVICES = ("cuda",)  # where a model loaded to evaluate keeps the bf16 tensors nanochat stored (its embeddings)

def read_pt(path, device):
    """torch.load with weights_only: a damaged or hostile file is one line naming it, never run."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except torch.OutOfMemoryError:  # a full GPU, not a damaged file
        raise
    except Exception as e:
        why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
        raise UserError(f"{path}: not a readable checkpoint, truncated or damaged? ({why})") from None

def read_meta(path):
    """A checkpoint's meta: a JSON object, else one line naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: missing (the checkpoint has a model file but no meta)") from None
    except (ValueError, RecursionError, OSError) as e:  # bad JSON or UTF-8, nested too deep, a directory
        raise UserError(f"{path}: not a readable JSON meta ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    return meta

def load_checkpoint(checkpoint_dir, step, device, keep_bf16=False):
    """(state dict, meta) of a step: a compiled model's _orig_mod. dropped, floats made float32 (bf16 kept if
    keep_bf16). Checked before anything is built from it: dense float tensors, each with the values it claims."""
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    if not os.path.exists(model_path):
        raise missing(model_path, f"checkpoint for step {step}", r"model_\d+\.pt")
    model_data = read_pt(model_path, device)
    if not isinstance(model_data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in model_data.items()):
        raise UserError(f"{model_path}: not a state dict of tensors by name")
    for key, v in model_data.items():
        if v.layout != torch.strided:
            problem = f"a {v.layout} tensor; a model's weights are dense"
        elif not v.is_floating_point():
            problem = f"{v.dtype} values; a model's weights are floats"
        elif v.untyped_storage().nbytes() < v.numel() * v.element_size():  # a stride-0 view: a tiny file, huge tensors
            problem = f"{v.numel():,} values in a storage of {v.untyped_storage().nbytes():,} bytes (an expanded view)"
        else:
            continue
        raise UserError(f"{model_path}: {key} holds {problem}")
    keep = (torch.float32, torch.bfloat16) if keep_bf16 else (torch.float32,)
    return {k.removeprefix("_orig_mod."): v if v.dtype in keep else v.float()
            for k, v in model_data.items()}, read_meta(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"))

def load_optimizer_shards(checkpoint_dir, step):
    """nanochat 2026's optimizer state of a step, one state dict per rank that saved it (optim_<step>_rank<r>.pt),
    or None where there is none (Nov 2025 writes one optim_<step>.pt of another layout: not read)."""
    if type(step) is not int:  # the step of the model's meta
        raise UserError(f"{checkpoint_dir}: the meta's step is {step!r}, not a whole number")
    paths = {int(m[1]): f for f in glob.glob(os.path.join(glob.escape(checkpoint_dir), f"optim_{step:06d}_rank*.pt"))
             if (m := re.search(r"rank(\d+)\.pt$", f))}
    if sorted(paths) != list(range(len(paths))):
        raise UserError(f"{checkpoint_dir}: optimizer shards of step {step} miss ranks: {sorted(paths.values())}")
    shards = [read_pt(paths[rank], "cpu") for rank in range(len(paths))]
    if not all(isinstance(s, dict) and isinstance(s.get("param_groups"), list) and isinstance(s.get("state"), dict)
               for s in shards):
        raise UserError(f"{checkpoint_dir}: optim_{step:06d}_rank*.pt are not optimizer state dicts")
    return shards or None

# model_config's keys but window_pattern, with sane bounds checked before anything is built (rotary: 10 x sequence_len)
CONFIG_BOUNDS = {"sequence_len": 1 << 16, "vocab_size": 1 << 22, "n_layer": 1024, "n_head": 1024, "n_kv_head": 1024,
                 "n_embd": 1 << 16}
ROTARY_VALUES = 1 << 28  # each rotary table (10 x sequence_len x head size floats): 65536 x 256 fits
KEYS_2026 = ("resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda")

def config_from_checkpoint(model_config, model_data, where):
    """The GPTConfig of a checkpoint; 2026 has window_pattern and its extra tensors, Nov 2025
    neither, and a mix is refused. Applies nanochat 92d63d4's two loading patches to 2026's."""
    model_config = model_config if isinstance(model_config, dict) else {}
    missing = [k for k in CONFIG_BOUNDS if k not in model_config]
    extra = sorted(set(model_config) - set(CONFIG_BOUNDS) - {"window_pattern"})
    if missing or extra:  # neither generation's
        problem = f"lacks {', '.join(missing)}" if missing else f"has unknown keys {', '.join(extra)}"
        raise UserError(f"{where}: the meta's model_config {problem}: "
                        "neither nanochat generation (Nov 2025, 2026) writes that")
    for key, most in CONFIG_BOUNDS.items():  # before anything is built or allocated from them
        if type(model_config[key]) is not int or not 1 <= model_config[key] <= most:
            raise UserError(f"{where}: the meta's model_config {key}={model_config[key]!r} is not a whole number "
                            f"from 1 to {most:,}")
    n_embd, n_head, n_kv_head = model_config["n_embd"], model_config["n_head"], model_config["n_kv_head"]
    if n_embd % n_head or n_head % n_kv_head or (n_embd // n_head) % 2:
        raise UserError(f"{where}: the meta's model_config has n_embd={n_embd}, n_head={n_head}, n_kv_head="
                        f"{n_kv_head}: heads must split n_embd into even halves and n_kv_head divide n_head")
    if (rotary := 10 * model_config["sequence_len"] * (n_embd // n_head)) > ROTARY_VALUES:
        raise UserError(f"{where}: the meta's model_config has sequence_len={model_config['sequence_len']} and "
                        f"heads of {n_embd // n_head}: rotary tables of {rotary:,} values (10 x both), "
                        f"more than {ROTARY_VALUES:,}")
    blocks = {int(m[1]) for k in model_data if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    if blocks != set(range(model_config["n_layer"])):
        raise UserError(f"{where}: the meta says n_layer={model_config['n_layer']} but the weights hold "
                        f"{len(blocks)} blocks")
    new_keys = [k for k in model_data
                if k in KEYS_2026 or k.startswith("value_embeds.") or k.endswith(".ve_gate.weight")]
    pattern = model_config.get("window_pattern")
    if pattern is not None and not new_keys:
        raise UserError(f"{where}: model_config is nanochat 2026's (it has window_pattern) but the state dict is Nov "
                        f"2025's (no {', '.join(KEYS_2026)}, value_embeds): meta and weights do not belong together")
    if new_keys and pattern is None:  # an intermediate 2026 commit: nanochat reads it as all-long windows
        print(f"note: {where}: 2026 weights, no window_pattern: using \"L\" as nanochat does", file=sys.stderr)
        pattern = "L"
    if pattern is not None and not (isinstance(pattern, str) and re.fullmatch(r"[SLsl]+", pattern)):
        raise UserError(f"{where}: model_config window_pattern {pattern!r} is not a string of S and L")
    if new_keys:  # nanochat 92d63d4 adds these two when absent (checkpoints from before them)
        n_layer, device = model_config["n_layer"], model_data[new_keys[0]].device
        model_data.setdefault("resid_lambdas", torch.ones(n_layer, device=device))
        model_data.setdefault("x0_lambdas", torch.zeros(n_layer, device=device))
    return GPTConfig(**dict(model_config, window_pattern=pattern))

def checkpoint_dir_for(source, model_tag=None, base_dir=None):
    if source not in SOURCE_DIRS:
        raise UserError(f"unknown checkpoint source {source!r}; expected one of {', '.join(SOURCE_DIRS)}")
    root = os.path.join(base_dir or get_base_dir(), SOURCE_DIRS[source])
    return os.path.join(root, model_tag or find_largest_model(root))

def load_model(source, device, phase, model_tag=None, step=None, base_dir=None):
    """(model, tokenizer, meta) from $NANOCHAT_BASE_DIR/<source's directory>/<tag>/ (tag: by default
    find_largest_model's, step: the latest), phase "train" or "eval"."""
    assert phase in ("train", "eval"), phase
    checkpoint_dir, device = checkpoint_dir_for(source, model_tag, base_dir), torch.device(device)
    last = find_last_step(checkpoint_dir)  # also: a missing directory's error names the tags there
    step = last if step is None else step
    tokenizer = get_tokenizer(base_dir)
    # training keeps float32 master weights: fused AdamW writes bf16 back, where DPO's embedding steps (about
    # 1.5e-3 at d20) are below half an ulp for |w| >= 0.5 and vanish
    model_data, meta = load_checkpoint(checkpoint_dir, step, device, phase == "eval" and device.type in BF16_DEVICES)
    where = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    config = config_from_checkpoint(meta.get("model_config"), model_data, where)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(f"{checkpoint_dir}: the model's vocab_size is {config.vocab_size} but the tokenizer "
                        f"has {tokenizer.get_vocab_size()} tokens (wrong tokenizer for this checkpoint?)")
    with torch.device("meta"):
        model = GPT(config)
    # every key the model has, none it lacks, each of its shape; else one line naming them
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{what} {', '.join(keys[:4])}{f' and {len(keys) - 4} more' if len(keys) > 4 else ''}"
                for what, keys in (("missing", [k for k in expected if k not in model_data]),
                                   ("unexpected", [k for k in model_data if k not in expected])) if keys]
    problems += [f"{k} is {list(model_data[k].shape)}, expected {list(s)}"
                 for k, s in expected.items() if k in model_data and tuple(model_data[k].shape) != s][:2]
    if problems:
        raise UserError(f"{where} does not match its model_config (nanochat {'2026' if model.gen2026 else 'Nov 2025'} "
                        f"model): {'; '.join(problems)}")
    if bad := next((k for k, v in model_data.items() if not torch.isfinite(v).all()), None):
        raise UserError(f"{where}: {bad} holds NaN or infinite values; the checkpoint is damaged")
    model.to_empty(device=device)
    model.init_rotary()
    model.load_state_dict(model_data, strict=True, assign=True)
    model.train() if phase == "train" else model.eval()
    return model, tokenizer, meta

def stage_config(stage, source, loaded_meta):
    """The settings (meta's user_config: split, beta, ...) of a stage's run: the loaded checkpoint's (of `source`)
    if it is that stage's, else the stage's default directory's latest (round 0's, DPO on the persona pairs, not an
    on-policy round's); {} if none (or not an object)."""
    meta = loaded_meta
    if stage != source:
        try:
            directory = checkpoint_dir_for(stage)
            directory = round_0 if os.path.isdir(round_0 := re.sub(r"_r\d+$", "", directory)) else directory
            meta = read_meta(os.path.join(directory, f"meta_{find_last_step(directory):06d}.json"))
        except UserError:
            return {}
    return meta["user_config"] if isinstance(meta.get("user_config"), dict) else {}

def held_out_fractions(source, meta, sft_val_fraction=-1.0, dpo_val_fraction=-1.0):
    """(SFT's, DPO's) held-out shares of the trader data: a given one (>= 0), else the one the SFT or DPO run behind
    a checkpoint of `source` (its `meta`) used, else sft.py's or dpo.py's default. eval.py scores these prompts;
    onpolicy.py samples none of them."""
    def share(stage, key, default, given):
        if given >= 0:
            return given
        value = stage_config(stage, source, meta).get(key, default)
        if type(value) not in (int, float) or not 0 <= value < 1:
            raise UserError(f"the {stage.upper()} run's meta has user_config {key}={value!r}, not a share in [0, 1): "
                            f"pass --{stage}_val_fraction")
        return value
    return (share("sft", "trader_val_fraction", 0.1, sft_val_fraction),
            share("dpo", "val_fraction", 0.05, dpo_val_fraction))

def fresh_base(base_dir, depth=2, sequence_len=512, n_embd=None, n_head=None, seed=0, zero_out=True, generation=2025):
    """Write tokenizer/ and base_checkpoints/d{depth}/model_000000.pt (width 64 * depth, a head per
    128, 2026: windows SSSL; n_embd/n_head override) into base_dir; zero_out=False: non-zero logits."""
    assert generation in (2025, 2026), generation
    enc, tokenizer_dir = byte_level_encoding(), os.path.join(base_dir, "tokenizer")
    # tokenizer.pkl and token_bytes.pt as nanochat writes them: a byte is 1 byte, a special token 0 (in bpb)
    atomic_write(os.path.join(tokenizer_dir, "tokenizer.pkl"), lambda f: pickle.dump(enc, f), binary=True)
    token_bytes = torch.tensor([1] * 256 + [0] * len(SPECIAL_TOKENS), dtype=torch.int32)
    atomic_write(os.path.join(tokenizer_dir, "token_bytes.pt"), lambda f: torch.save(token_bytes, f), binary=True)
    n_embd = n_embd or depth * 64
    n_head = n_head or max(1, (n_embd + 127) // 128)
    config = GPTConfig(sequence_len, enc.n_vocab, depth, n_head, n_head, n_embd, "SSSL" if generation == 2026 else None)
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights(zero_out=zero_out)
    # model_config as nanochat of this generation writes it (Nov 2025: no window_pattern)
    meta = {"step": 0, "model_config": {k: v for k, v in asdict(config).items() if v is not None},
            "chimera": {"stage": "base"}, "user_config": {"depth": depth, "fresh": True, "seed": seed}}
    checkpoint_dir = os.path.join(base_dir, "base_checkpoints", f"d{depth}")
    save_checkpoint(checkpoint_dir, 0, model.state_dict(), meta)
    return checkpoint_dir

class RunDir:
    """A stage's output directory holds one run: a new run removes the earlier Chimera run's
    files (and a killed save's .tmp files) and refuses checkpoints Chimera did not write."""

    def __init__(self, stage, tag, master, start):
        self.path, self.stage, self.master = os.path.join(get_base_dir(), SOURCE_DIRS[stage], tag), stage, master
        self.start = checkpoint_dir_for(*start)
        if os.path.abspath(self.path) == os.path.abspath(self.start):  # clearing it would lose it
            raise UserError(f"{self.path} holds the checkpoint this run starts from; pass another --out_tag")
        old = [f for pattern in ("model_*.pt", "optim_*.pt", "meta_*.json", "metrics.jsonl", ".*.tmp")
               for f in glob.glob(os.path.join(glob.escape(self.path), pattern))]
        metas = {re.sub(r"(model|optim)_(\d+)\.pt$", r"meta_\2.json", f) for f in old if f.endswith(("pt", "json"))}
        for meta in metas:
            try:
                marked = "chimera" in read_meta(meta)
            except UserError:  # missing or damaged: not Chimera's either
                marked = False
            if not marked:
                raise UserError(f"{self.path}: {os.path.basename(meta)} is not a Chimera checkpoint; "
                                "use another --out_tag")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has looked before rank 0 removes
        for f in old if master else []:
            os.remove(f)
        os.makedirs(self.path, exist_ok=True)

    def log(self, record):
        if self.master:
            with open(os.path.join(self.path, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, step, model, meta):
        """model_/meta_{step:06d} marked as this stage's, with the start's tag; non-finite weights are never saved."""
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise UserError(f"step {step}: the weights are not finite (NaN or inf); nothing saved")
        if self.master:
            marked = {**meta, "source_tag": os.path.basename(self.start), "chimera": {"stage": self.stage}}
            save_checkpoint(self.path, step, model.state_dict(), marked)
            print(f"saved {self.path}/model_{step:06d}.pt", flush=True)

if __name__ == "__main__":  # run.sh asks what Python decides: the answer on stdout, a bad CHIMERA_START's line too
    command, *args = sys.argv[1:] or [""]
    if command == "start" and len(args) in (1, 2):  # shell lines for START, START_DIR and TAG
        source = (args + [""])[1] or default_start(args[0])
        if source not in ("mid", "base", "sft"):
            print(f"CHIMERA_START={source}: expected mid, base or sft")
            sys.exit(1)
        start_dir = f"{args[0]}/{SOURCE_DIRS[source]}"  # joined as run.sh always did: its stamps hold these paths
        print(f"START={source} START_DIR={shlex.quote(start_dir)} TAG={shlex.quote(nanochat_tag(start_dir) or '')}")
    else:
        sys.exit("usage: python checkpoint.py start BASE_DIR [mid|base|sft]")
