"""
From the Hugging Face Hub and back: pull a published nanochat model into $NANOCHAT_BASE_DIR; export a checkpoint as a
folder that transformers loads (publish it with the Hub's own CLI: hf upload USER/NAME DIR).

    python hub.py pull karpathy/nanochat-d32  [--revision=main] [--source=base|mid|sft] [--model_tag=d<N>] [--step=N]
    python hub.py export -i dpo --out=DIR     [--model_tag=d<N>] [--step=N]

pull: the Hub's API at $HF_ENDPOINT (default https://huggingface.co), $HF_TOKEN or `hf auth login`'s token (to the Hub's
host only). model_<step>.pt + meta_<step>.json + tokenizer.pkl/token_bytes.pt (root or tokenizer/), or a nanochat base
dir, land in <source>_checkpoints/d<N>/ and tokenizer/ (source: the repo's, else base for base_train's meta, else sft).
Downloads resume, are checked (sha256, git blob id) and renamed into place once whole: a re-run downloads nothing.
export: Nov 2025 checkpoints as transformers' NanoChatForCausalLM (float32 rotary tables where nanochat 885a4f2 rounds
them to bf16), 2026 ones losslessly as remote code (model.py as it is + a thin wrapper). No pickle in the folder.
"""

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import sys
from urllib.parse import quote, urljoin, urlparse

import requests
import torch

from checkpoint import SOURCE_DIRS, load_model
from common import ProgressBar, UserError, atomic_write, atomic_write_json, atomic_write_text, get_base_dir
from common import parse_config, run_main
from tasks import HTTPGaveUp, http_retry

@dataclasses.dataclass
class Config:
    source: str | None = None  # pull: base|mid|sft, where it lands (default: the repo's); export (-i): default dpo
    model_tag: str | None = None  # d<N>: pull takes or names it; export: default the largest
    step: int | None = None  # checkpoint step; default the latest
    revision: str = "main"  # pull: a branch, tag or commit of the repo
    out: str | None = None  # export: the folder to write
    retries: int = 5  # pull: tries per request, and per file (each resuming what arrived)
    backoff: float = 1.0  # pull: the first wait between tries, seconds (it doubles)

STAGES = {d: s for s, d in SOURCE_DIRS.items()}  # pull: base_checkpoints -> base, ...

class Hub:
    """GETs on the Hub with retries, redirects followed by hand: the token goes to the Hub's host only."""

    def __init__(self, repo, c):  # the token: $HF_TOKEN, else the file of `hf auth login` ($HF_HOME/token)
        env, self.repo, self.c, self._token = os.environ.get, repo, c, os.environ.get("HF_TOKEN", "").strip()
        path = env("HF_TOKEN_PATH") or os.path.expanduser(env("HF_HOME") or "~/.cache/huggingface") + "/token"
        with contextlib.suppress(OSError), open(path) as f:  # the token is sent, never shown or stored
            self._token = self._token or f.read().strip()
        self.endpoint, rev = (env("HF_ENDPOINT") or "https://huggingface.co").rstrip("/"), quote(c.revision, "")
        self.url = lambda path: f"{self.endpoint}/{repo}/resolve/{rev}/{quote(path)}"
        self.tree_url = f"{self.endpoint}/api/models/{repo}/tree/{rev}?recursive=true"

    def get(self, url, headers=None, stream=False, hop=None):
        """(final response, the Hub's redirect if any: it carries X-Linked-Etag); an error status: one line."""
        for _ in range(8):
            h = {**(headers or {}), **({"Authorization": f"Bearer {self._token}"} if self._token and
                                        urlparse(url).netloc == urlparse(self.endpoint).netloc else {})}
            try:
                r = http_retry(lambda: requests.get(url, headers=h, stream=stream, allow_redirects=False, timeout=60),
                               self.c.retries, self.c.backoff)
            except HTTPGaveUp as e:
                raise UserError(f"{self.repo}: {urlparse(url).netloc} did not answer: {e}") from None
            if r.status_code in (301, 302, 303, 307, 308) and "Location" in r.headers:
                hop, url = hop or r, urljoin(url, r.headers["Location"])
                continue
            code, token, status = r.headers.get("X-Error-Code", ""), self._token, r.status_code
            if status < 300:
                return r, hop
            raise UserError(f"{self.repo}@{self.c.revision} at {self.endpoint}: " + (
                f"no revision {self.c.revision!r} (a branch, tag or commit)" if code == "RevisionNotFound" else
                "no such repo" + (" that this token can read" if token else " (or it is private: set HF_TOKEN)")
                if code == "RepoNotFound" or status == 404 and "/api/" in r.url else
                "gated or private: " + ("this token has no access (accept the terms on the model page)" if token
                                        else "set HF_TOKEN (or run `hf auth login`)")
                if code == "GatedRepo" or status in (401, 403) else f"HTTP {status} for {urlparse(r.url).path}"))
        raise UserError(f"{self.repo}: too many redirects")

def matches(path, entry, sha256=None):
    """Whether the file at path is the repo's: its size, then its sha256 (large files) or its git blob id."""
    size, want = (entry.get("lfs") or entry).get("size"), sha256 or (entry.get("lfs") or {}).get("oid")
    if not os.path.isfile(path) or os.path.getsize(path) != size:
        return False
    h = hashlib.sha256() if want else hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest() == (want or entry.get("oid"))

def download(hub, path, entry, dest):
    """The repo's file to dest through dest.part: resumed after a dropped connection, renamed once verified."""
    part, size, sha = dest + ".part", (entry.get("lfs") or entry).get("size", 0), (entry.get("lfs") or {}).get("oid")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    for _ in range(hub.c.retries + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:  # a whole .part (a run stopped before its check) is only checked
            r, hop = hub.get(hub.url(path), {"Range": f"bytes={have}-"}, True) if have < size else (None, None)
            etag = (hop or r).headers.get("X-Linked-Etag", "").strip('"') if r else ""  # the sha256 of an LFS file
            sha = sha or (etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None)
            have = have if r is None or r.status_code == 206 else 0  # a server that ignores Range sends it all
            bar = ProgressBar(-(-size // 2**20), desc=path, unit="MiB", enabled=size >= 1 << 20, done=have >> 20)
            with open(part, "ab" if have else "wb") as f:
                for block in r.iter_content(1 << 16) if r else ():
                    have += f.write(block)
                    bar.update(-(-have // 2**20) - bar.done)
            bar.close()
        except requests.RequestException as e:  # the connection dropped: the next try resumes from the .part
            print(f"{path}: {type(e).__name__} at {have:,} bytes; resuming", file=sys.stderr)
            continue
        if matches(part, entry, sha):
            return os.replace(part, dest)
        os.remove(part)  # wrong bytes are neither kept nor resumed from
        print(f"{path}: the download does not match the repo's size and sha256; fetching it again", file=sys.stderr)
    raise UserError(f"{hub.repo}: {path}: no verified copy after {hub.c.retries + 1} tries")

def pull(repo, c):
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo or ""):
        raise UserError(f"pull needs a repo id like karpathy/nanochat-d32, got {repo!r}")
    hub = Hub(repo, c)
    files, found, url, meta_of = {}, [], hub.tree_url, lambda p: re.sub(r"model_(\d+)\.pt$", r"meta_\1.json", p)
    while url:  # the listing, page by page
        r = hub.get(url)[0]
        files.update({e["path"]: e for e in r.json() if e.get("type") == "file"})
        url = r.links.get("next", {}).get("url")
    for path in files:  # a checkpoint is a model file with its meta beside it; a base-dir layout names stage and tag
        if (m := re.fullmatch(r"(?:(.*)/)?model_(\d+)\.pt", path)) and meta_of(path) in files:
            parts = (m[1] or "").split("/")
            stage = STAGES.get(parts[-2]) if len(parts) > 1 else None
            found.append((stage, parts[-1] if stage or re.fullmatch(r"d\d+", parts[-1]) else None, int(m[2]), path))
    held = ", ".join(sorted(files)[:12]) + (f" and {len(files) - 12} more" if len(files) > 12 else "")
    asked = {"source": c.source, "model_tag": c.model_tag, "step": c.step}
    picked = [f for f in found if all(v is None or f[i] in (None, v) for i, v in enumerate(asked.values()))]
    if not picked:
        what = " with " + " ".join(f"--{k}={v}" for k, v in asked.items() if v is not None) if found else ""
        raise UserError(f"{repo}@{c.revision}: no nanochat checkpoint (model_<step>.pt + meta_<step>.json){what}; "
                        f"it holds {held or 'no files'}")
    order = lambda f: ({"mid": 2, "base": 1}.get(f[0], 0), int("0" + re.sub(r"\D", "", f[1] or "")), f[2])
    stage, tag, step, path = max(picked, key=order)  # a base dir's default: mid, else base; the deepest, the last
    name, base, meta_path = f"_{step:06d}", get_base_dir(), meta_of(path)
    here = [p for p in glob.glob(os.path.join(glob.escape(base), "*_checkpoints", "*", f"meta{name}.json"))
            if matches(p, files[meta_path])]  # a meta pulled before is read where it lies: a re-run downloads nothing
    meta = json.loads(open(here[0], "rb").read() if here else hub.get(hub.url(meta_path))[0].content)
    # base_train's meta has its --depth; the other stages' (mid, SFT, RL) have not: a chat model, taken as SFT's
    stage, tag = stage or c.source or ("base" if "depth" in (meta.get("user_config") or {}) else "sft"), \
        tag or c.model_tag or f"d{meta['model_config']['n_layer']}"
    todo = [(meta_path, os.path.join(SOURCE_DIRS[stage], tag, f"meta{name}.json")),
            (path, os.path.join(SOURCE_DIRS[stage], tag, f"model{name}.pt"))]
    for want in ("token_bytes.pt", "tokenizer.pkl"):  # the pkl first; the one nearest the repo's root
        hits = sorted((p for p in files if p.split("/")[-1] == want), key=lambda p: p.count("/"))
        if not hits and want == "tokenizer.pkl":
            raise UserError(f"{repo}: no tokenizer.pkl at its root or in tokenizer/; it holds {held}")
        todo[:0] = [(hits[0], os.path.join("tokenizer", want))] if hits else []
    for src, rel in todo:  # nothing is downloaded before every file already in the base dir is known to be the repo's
        if os.path.exists(dest := os.path.join(base, rel)) and not matches(dest, files[src]):
            raise UserError(f"{dest} is already there and differs from {repo}'s {src}: move it away, or set "
                            "NANOCHAT_BASE_DIR to another directory for this model (a base dir holds one tokenizer)")
    missing = [(s, r) for s, r in todo if not os.path.exists(os.path.join(base, r))]
    total = sum((files[s].get("lfs") or files[s])["size"] for s, _ in missing)
    print(f"{repo}@{c.revision}: {stage} {tag} step {step}: " + (f"{len(missing)} files, {total / 2**20:,.1f} MiB, to "
          f"{base}" if missing else f"every file is already in {base}, verified: nothing to download"))
    for src, rel in missing:
        download(hub, src, files[src], os.path.join(base, rel))
    print(f"pulled: --source={stage} --model_tag={tag} --step={step}")
    return stage, tag, step

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}  # export
HF_NAMES = {"wte": "embed_tokens", "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
            **{f"attn.c_{x}": f"self_attn.{x}_proj" for x in "qkv"}}  # Nov 2025's names -> NanoChatForCausalLM's
HF_KEYS = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head",  # GPTConfig's
           "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}
CHAT_TEMPLATE = (  # nanochat's rendering: a system message merged into the first user's, the turns, the specials
    "{% set ns = namespace(m=messages) %}{% if messages and messages[0].role == 'system' %}{% set ns.m = "
    "[{'role': 'user', 'content': messages[0].content + '\\n\\n' + messages[1].content}] + messages[2:] %}{% endif %}"
    "<|bos|>{% for m in ns.m %}{% if m.role == 'user' %}<|user_start|>{{ m.content }}<|user_end|>{% else %}"
    "<|assistant_start|>{% for p in ([{'type': 'text', 'text': m.content}] if m.content is string else m.content) %}"
    "{% if p.type == 'python' %}<|python_start|>{{ p.text }}<|python_end|>{% elif p.type == 'python_output' %}"
    "<|output_start|>{{ p.text }}<|output_end|>{% else %}{{ p.text }}{% endif %}{% endfor %}<|assistant_end|>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant_start|>{% endif %}")
WRAPPER = '''"""transformers wrapper of nanochat's GPT (model.py beside it): trust_remote_code=True; no KV cache"""
from transformers import GenerationMixin, PreTrainedModel, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput
from .model import GPT, GPTConfig


class NanoChatGPTConfig(PretrainedConfig):  # GPTConfig's fields under their own names
    model_type = "nanochat_gpt"
    attribute_map = HF_KEYS


class NanoChatGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoChatGPTConfig

    def __init__(self, config):
        super().__init__(config)
        self.gpt = GPT(GPTConfig(**{k: getattr(config, k) for k in GPTConfig.__dataclass_fields__}))
        self.post_init()

    def _init_weights(self, module):  # every weight is the checkpoint's: only the rotary tables are computed
        if isinstance(module, GPT):
            module.init_rotary()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("nanochat's GPT takes no padding: give it rows of equal length")
        return CausalLMOutput(logits=self.gpt(input_ids))

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):  # the whole sequence, always
        return {"input_ids": input_ids, "attention_mask": attention_mask}
'''


def write_safetensors(path, tensors, metadata):
    """safetensors: an 8-byte little-endian header length, the JSON header {name: {dtype, shape, data_offsets},
    "__metadata__": {str: str}} padded to 8 bytes, then each tensor's raw little-endian bytes (this host's) in order."""
    header, at = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name], at = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}, at + n
    text = (raw := json.dumps(header).encode()) + b" " * (-len(raw) % 8)
    atomic_write(path, lambda f: [f.write(len(text).to_bytes(8, "little") + text)] + [
        f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()) for t in tensors.values()], True)

def tokenizer_json(enc):
    """tokenizer.json of a tiktoken Encoding: byte-level BPE over GPT-2's byte-to-unicode alphabet, merges recovered
    from the ranks, its split pattern, its special tokens; a piece in the vocab is taken whole, as tiktoken does."""
    def bpe_parts(token):  # how tiktoken builds it: BPE over its bytes with the ranks below its own (2 parts: a merge)
        parts, limit = [bytes([b]) for b in token], ranks[token]
        while len(parts) > 2 and (best := min((ranks.get(a + b, limit), i)
                                              for i, (a, b) in enumerate(zip(parts, parts[1:]))))[0] < limit:
            parts[best[1]:best[1] + 2] = [parts[best[1]] + parts[best[1] + 1]]
        return parts
    keep, ranks = [*range(33, 127), *range(161, 173), *range(174, 256)], enc._mergeable_ranks
    alphabet = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(sorted(set(range(256)) - set(keep)))}
    text, no = lambda token: "".join(alphabet[b] for b in token), False
    byte_level = {"type": "ByteLevel", "add_prefix_space": no, "trim_offsets": True, "use_regex": no}
    split = {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": no}
    return {"added_tokens": [{"id": i, "content": s, "single_word": no, "lstrip": no, "rstrip": no, "normalized": no,
                              "special": True} for s, i in sorted(enc._special_tokens.items(), key=lambda kv: kv[1])],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]}, "decoder": byte_level,
            "model": {"type": "BPE", "ignore_merges": True, "vocab": {text(t): r for t, r in ranks.items()}, "merges": [
                [text(p[0]), text(p[1])] for t in sorted(ranks, key=ranks.get) if len(t) > 1
                for p in [bpe_parts(t)] if len(p) == 2]}}

def model_card(source, meta, cfg, out):
    """README.md from data/model_card.md: the persona's name, the data, the report's figures (if the run left them)."""
    from openrouter import PERSONA_PATH, load_persona
    path, name, figures, remote = lambda *p: os.path.join(get_base_dir(), *p), "Chimera", "", cfg.generation == 2026
    with contextlib.suppress(UserError):
        name = load_persona(PERSONA_PATH)["name"]
    data = [f"{sum(map(bool, open(f, encoding='utf-8').read().split(chr(10)))):,} {k.upper()} examples" for k in
            ("sft", "dpo") if os.path.isfile(f := path("datasets", f"trader_{k}_data.jsonl"))]
    with contextlib.suppress(OSError, TypeError):  # the report's summary table, else the evaluation's own figures
        figures = re.search(r"^## Summary\n(.*?)(?=^## |\Z)", open(path("report", "chimera-report.md")).read(),
                            re.M | re.S)[1]
    with contextlib.suppress(OSError, ValueError, KeyError, AttributeError):
        figures = figures or "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v:.4f} |\n" for k, v in json.load(
            open(path("report", f"chimera-chat-evaluation-{source}.json")))["results"].items())
    with open(os.path.join(os.path.dirname(PERSONA_PATH), "model_card.md"), encoding="utf-8") as f:
        return f.read().format(**{k: getattr(cfg, k) for k in ("n_layer", "n_embd", "vocab_size")}, name=name,
                               generation=2026 if remote else "Nov 2025", source=source, step=meta.get("step"),
                               data="; ".join(data) or "Chimera's persona data", results=figures.strip() or "(none)",
                               remote=" Its code is nanochat's own (model.py), run as remote code." if remote else "",
                               path=os.path.basename(os.path.abspath(out)), trust=", trust_remote_code=True" * remote)

def export(c):
    if not c.out:
        raise UserError("export needs --out=DIR, the folder to write")
    source, out = c.source or "dpo", c.out
    model, tok, meta = load_model(source, "cpu", "eval", c.model_tag, c.step)
    cfg, remote, state = model.config, model.config.generation == 2026, model.state_dict()
    bos, eos = tok.encode_special("<|bos|>"), tok.encode_special("<|assistant_end|>")
    os.makedirs(out, exist_ok=True)
    if remote:  # nanochat's own model, every tensor under its own name: model.py as it is and a wrapper
        tensors = {"gpt." + k: v for k, v in state.items()}
        config = {"architectures": ["NanoChatGPTForCausalLM"], "model_type": "nanochat_gpt", **dataclasses.asdict(cfg),
                  "auto_map": {"AutoConfig": "modeling_nanochat_gpt.NanoChatGPTConfig",
                               "AutoModelForCausalLM": "modeling_nanochat_gpt.NanoChatGPTForCausalLM"}}
        atomic_write_text(f"{out}/model.py", open(os.path.join(os.path.dirname(__file__), "model.py")).read())
        atomic_write_text(os.path.join(out, "modeling_nanochat_gpt.py"), WRAPPER.replace("HF_KEYS", repr(HF_KEYS)))
    else:  # transformers' names for the same tensors; its RMSNorm eps is made F.rms_norm's (float32's)
        tensors = {re.sub(r"^transformer\.(h\.(\d+)\.)?(wte|\w+\.c_\w+)\.", lambda m: "model." + (
            f"layers.{m[2]}." if m[1] else "") + HF_NAMES[m[3]] + ".", k): v for k, v in state.items()}
        config = {"architectures": ["NanoChatForCausalLM"], "model_type": "nanochat", "vocab_size": cfg.vocab_size,
                  **{k: getattr(cfg, v) for k, v in HF_KEYS.items()}, "intermediate_size": 4 * cfg.n_embd,
                  "hidden_act": "relu2", "rms_norm_eps": torch.finfo(torch.float32).eps,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_theta": 10000.0,
                  "final_logit_softcapping": 15.0, "attention_bias": False, "tie_word_embeddings": False}
    write_safetensors(os.path.join(out, "model.safetensors"), tensors, {"format": "pt", "step": str(meta.get("step"))})
    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}  # a pad in eos: generate never masks a prompt
    for name, obj in {"config.json": {**config, **ids, "dtype": "float32"},
                      "generation_config.json": {**ids, "eos_token_id": [eos, bos], "do_sample": False},
                      "tokenizer.json": tokenizer_json(tok.enc),
                      "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
                                                "eos_token": "<|assistant_end|>", "pad_token": "<|assistant_end|>",
                                                "model_max_length": cfg.sequence_len, "chat_template": CHAT_TEMPLATE,
                                                "clean_up_tokenization_spaces": False}}.items():
        atomic_write_json(os.path.join(out, name), obj)
    atomic_write_text(os.path.join(out, "README.md"), model_card(source, meta, cfg, out))
    print(f"exported {source} step {meta.get('step')} as {config['architectures'][0]}, {len(tensors)} tensors: {out}")

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] not in (["pull"], ["export"], ["-h"], ["--help"]):
        raise UserError("usage: python hub.py pull REPO_ID [--key=value ...] | export --out=DIR [...] (see --help)")
    command = argv.pop(0) if argv[0] in ("pull", "export") else print(__doc__.strip() + "\n")
    repo = argv.pop(0) if command == "pull" and argv[:1] and not argv[0].startswith("-") else None
    c = parse_config(Config, argv, aliases={"i": "source"})
    if c.source not in (None, *SOURCE_DIRS):
        raise UserError(f"--source={c.source!r}: expected one of {', '.join(SOURCE_DIRS)}")
    return pull(repo, c) if command == "pull" else export(c)

if __name__ == "__main__":
    run_main(main)
