"""
From the Hugging Face Hub and back: pull a published nanochat model into $NANOCHAT_BASE_DIR, and export a
checkpoint as a folder that Hugging Face transformers loads.

    python hub.py pull karpathy/nanochat-d32        # -> chatsft_checkpoints/d32/ and tokenizer/
    python hub.py pull USER/REPO --revision=main --source=base --model_tag=d20 --step=21400
    python hub.py export -i dpo --out=chimera-d20   # -> model.safetensors, config.json, tokenizer.json, README.md...
    hf upload USER/chimera-d20 chimera-d20          # the Hub's own CLI publishes the folder

pull speaks the Hub's HTTP API at $HF_ENDPOINT (default https://huggingface.co); a gated or private repo needs
$HF_TOKEN or the token file `hf auth login` writes. It reads repos holding model_<step>.pt + meta_<step>.json
(tokenizer.pkl + token_bytes.pt at the root or under tokenizer/) and nanochat base dirs (<stage>_checkpoints/d<N>/,
tokenizer/). Large files follow the redirect to the Hub's CDN (the token stays with the Hub), resume, and are
checked against their sha256 (small ones against their git blob id) before a rename puts them in place: a re-run
downloads nothing. Defaults: the stage the repo says (else sft when the meta has SFT's metrics, base when it has
base_train's depth), the tag d<n_layer>, the latest step. A base dir holds one tokenizer: a different one is refused.
export writes Nov 2025 checkpoints as transformers' own NanoChatForCausalLM (model_type "nanochat"; it rotates
with float32 tables where nanochat 885a4f2 used bf16 ones) and 2026 checkpoints losslessly as remote code
(trust_remote_code=True: model.py as it is and a thin wrapper). No pickle in the folder.
"""

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import struct
import sys
from typing import Optional
from urllib.parse import quote, urljoin, urlparse

import requests
import torch

from checkpoint import SOURCE_DIRS, load_model
from common import ProgressBar, UserError, atomic_write, atomic_write_json, atomic_write_text, get_base_dir, \
    parse_config, run_main
from tasks import HTTPGaveUp, http_retry
from tokenizer import SPECIAL_TOKENS


@dataclasses.dataclass
class Config:
    source: Optional[str] = None  # pull: where it lands, base|mid|sft (default: what the repo holds); export: -i, default dpo
    model_tag: Optional[str] = None  # d<N>: pull picks it in the repo or names it; export: default the largest
    step: Optional[int] = None  # checkpoint step; default the latest
    revision: str = "main"  # pull: a branch, tag or commit of the repo
    out: Optional[str] = None  # export: the folder to write
    retries: int = 5  # pull: tries per request, and per file (each resuming what arrived)
    backoff: float = 1.0  # pull: the first wait between tries, seconds (it doubles)


# pull
STAGES = {d: s for s, d in SOURCE_DIRS.items()}  # base_checkpoints -> base, ...
PREFERRED = {"mid": 3, "base": 2, "sft": 1}  # a base-dir repo's default stage: Chimera starts from mid, else base
MODEL_FILE = re.compile(r"(?:(.*)/)?model_(\d+)\.pt")


def hf_token():
    """$HF_TOKEN, else the file the Hub's CLI writes ($HF_TOKEN_PATH, default $HF_HOME/token)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                     "huggingface")
    try:
        with open(os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token"), encoding="utf-8") as f:
            stored = f.read().strip()
    except OSError:
        stored = ""
    return os.environ.get("HF_TOKEN", "").strip() or stored or None


class Hub:
    """GET on the Hub with retries, redirects followed by hand: the token goes to the Hub's host only."""

    def __init__(self, repo, c):
        self.repo, self.c, self._token = repo, c, hf_token()  # the token is sent, never printed or stored
        self.endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        self.session = requests.Session()

    def get(self, url, headers=None, stream=False):
        """(final response, the Hub's redirect if any: it carries X-Linked-Etag / X-Linked-Size)."""
        hop = None
        for _ in range(8):
            mine = urlparse(url).netloc == urlparse(self.endpoint).netloc
            auth = {"Authorization": f"Bearer {self._token}"} if mine and self._token else {}
            try:
                r = http_retry(lambda: self.session.get(url, headers={**(headers or {}), **auth}, stream=stream,
                                                        allow_redirects=False, timeout=60), self.c.retries, self.c.backoff)
            except HTTPGaveUp as e:
                raise UserError(f"{self.repo}: {urlparse(url).netloc} did not answer: {e}") from None
            if r.status_code not in (301, 302, 303, 307, 308) or "Location" not in r.headers:
                return self.check(r), hop
            hop, url = hop or r, urljoin(url, r.headers["Location"])
            r.close()
        raise UserError(f"{self.repo}: too many redirects")

    def check(self, r):
        """The response, or the Hub's error as one line (X-Error-Code says which)."""
        if r.status_code < 300:
            return r
        code, repo, rev = r.headers.get("X-Error-Code", ""), self.repo, self.c.revision
        if code == "RepoNotFound" or (r.status_code == 404 and "/api/models/" in r.url and code != "RevisionNotFound"):
            problem = "no such repo" + (" (or it is private: set HF_TOKEN to a token that can read it)"
                                        if not self._token else " that this token can read")
        elif code == "RevisionNotFound" or r.status_code == 404 and "/api/" in r.url:
            problem = f"no revision {rev!r} (a branch, tag or commit)"
        elif r.status_code in (401, 403) or code == "GatedRepo":
            problem = ("gated or private: " + ("this token has no access (accept the terms on the model page)"
                                               if self._token else "set HF_TOKEN (or run `hf auth login`)"))
        else:
            problem = f"HTTP {r.status_code} for {urlparse(r.url).path}"
        raise UserError(f"{repo}@{rev} at {self.endpoint}: {problem}")

    def tree(self):
        """Every file of the repo at the revision: [{type, path, size, oid, lfs: {oid, size}?}], pages followed."""
        url, files = f"{self.endpoint}/api/models/{self.repo}/tree/{quote(self.c.revision, safe='')}?recursive=true", []
        while url:
            r, _ = self.get(url)
            files += [e for e in r.json() if e.get("type") == "file"]
            url = r.links.get("next", {}).get("url")
        return {e["path"]: e for e in files}

    def url(self, path):
        return f"{self.endpoint}/{self.repo}/resolve/{quote(self.c.revision, safe='')}/{quote(path)}"


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
    for attempt in range(hub.c.retries + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:  # a whole .part (a run stopped before its check) is only checked
            r, hop = hub.get(hub.url(path), {"Range": f"bytes={have}-"} if have else {}, stream=True) \
                if have < size else (None, None)
            etag = (hop or r).headers.get("X-Linked-Etag", "").removeprefix("W/").strip('"') if r else ""
            sha = sha or (etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None)
            have = have if r is None or r.status_code == 206 else 0  # a server that ignores Range sends it all
            bar = ProgressBar(-(-size // 2**20), desc=path, unit="MiB", enabled=size >= 1 << 20, done=have >> 20)
            with open(part, "ab" if have else "wb") as f:
                for block in r.iter_content(1 << 16) if r else ():
                    f.write(block)
                    have += len(block)
                    bar.update(-(-have // 2**20) - bar.done)
            bar.close()
        except requests.RequestException as e:  # the connection dropped: the next try resumes from the .part
            print(f"{path}: {type(e).__name__} at {have:,} bytes; resuming", file=sys.stderr)
            continue
        if matches(part, entry, sha):
            return os.replace(part, dest)
        os.remove(part)  # wrong bytes are never kept, nor resumed from
        print(f"{path}: the download does not match the repo's size and sha256; fetching it again", file=sys.stderr)
    raise UserError(f"{hub.repo}: {path}: no verified copy after {hub.c.retries + 1} tries")


def stage_of(meta):
    """Which stage wrote a checkpoint, from its meta: SFT's metrics, base_train's depth (2026 has no mid)."""
    if any(k in meta for k in ("val_loss", "mmlu_acc", "arc_easy_acc")) or \
            "window_pattern" in meta.get("model_config", {}) and "depth" not in meta.get("user_config", {}):
        return "sft"
    return "base" if "depth" in (meta.get("user_config") or {}) else None


def pull(repo, c):
    if not re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", repo or ""):
        raise UserError(f"pull needs a repo id like karpathy/nanochat-d32, got {repo!r}")
    hub = Hub(repo, c)
    files, found = hub.tree(), []
    for path in files:  # a checkpoint is a model file with its meta beside it
        if (m := MODEL_FILE.fullmatch(path)) and f"{m[1] + '/' if m[1] else ''}meta_{m[2]}.json" in files:
            parts = (m[1] or "").split("/")
            stage = STAGES.get(parts[-2]) if len(parts) > 1 else None  # a base-dir layout names stage and tag
            tag = parts[-1] if stage or re.fullmatch(r"d\d+", parts[-1]) else None
            found.append((stage, tag, int(m[2]), path))
    held = ", ".join(sorted(files)[:12]) + (f" and {len(files) - 12} more" if len(files) > 12 else "")
    asked = {"source": c.source, "model_tag": c.model_tag, "step": c.step}
    picked = [f for f in found if all(v is None or f[i] in (None, v) for i, v in enumerate(asked.values()))]
    if not picked:
        what = " with " + " ".join(f"--{k}={v}" for k, v in asked.items() if v is not None) if found else ""
        raise UserError(f"{repo}@{c.revision}: no nanochat checkpoint (model_<step>.pt + meta_<step>.json){what}; "
                        f"it holds {held or 'no files'}")
    depth = lambda t: int(t[1:]) if re.fullmatch(r"d\d+", t or "") else -1
    stage, tag, step, path = max(picked, key=lambda f: (PREFERRED.get(f[0], 0), depth(f[1]), f[2]))
    folder, name = os.path.dirname(path), f"_{step:06d}"
    meta_path = f"{folder + '/' if folder else ''}meta{name}.json"
    base = get_base_dir()  # a meta pulled before is read where it lies: a re-run downloads nothing
    here = [p for p in glob.glob(os.path.join(base, "*_checkpoints", "*", f"meta{name}.json")) if matches(p, files[meta_path])]
    try:
        meta = json.loads(open(here[0], "rb").read() if here else hub.get(hub.url(meta_path))[0].content)
        n_layer = meta["model_config"]["n_layer"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{repo}: {meta_path} is not a nanochat meta with model_config.n_layer") from None
    stage = stage or c.source or stage_of(meta)
    if stage is None:
        raise UserError(f"{repo}: {meta_path} does not say which stage wrote it: pass --source=base|mid|sft")
    tag = tag or c.model_tag or f"d{n_layer}"
    # the tokenizer: the one of this base-dir layout, else at the root or under tokenizer/
    roots = dict.fromkeys((folder, re.sub(r"/?[^/]*_checkpoints/[^/]*$", "", folder), ""))
    todo = [(meta_path, os.path.join(SOURCE_DIRS[stage], tag, f"meta{name}.json")),
            (path, os.path.join(SOURCE_DIRS[stage], tag, f"model{name}.pt"))]
    for want in ("token_bytes.pt", "tokenizer.pkl"):  # the pkl checked first
        hits = [p.lstrip("/") for r in roots for p in (f"{r}/{want}", f"{r}/tokenizer/{want}") if p.lstrip("/") in files]
        if not hits and want == "tokenizer.pkl":
            raise UserError(f"{repo}: no tokenizer.pkl beside the checkpoint (at the root or under tokenizer/); "
                            f"it holds {held}")
        todo[:0] = [(hits[0], os.path.join("tokenizer", want))] if hits else []
    # nothing is downloaded before every file already in the base dir is known to be the repo's
    for src, rel in todo:
        dest = os.path.join(base, rel)
        if os.path.exists(dest) and not matches(dest, files[src]):
            hint = ("a base dir holds one tokenizer: set NANOCHAT_BASE_DIR to another directory for this model"
                    if rel.startswith("tokenizer") else "move it away, or pull with another --model_tag")
            raise UserError(f"{dest} is already there and differs from {repo}'s {src}: {hint}")
    missing = [(s, r) for s, r in todo if not os.path.exists(os.path.join(base, r))]
    total = sum((files[s].get("lfs") or files[s])["size"] for s, _ in missing)
    print(f"{repo}@{c.revision}: {stage} {tag} step {step}: " + (f"{len(missing)} files, {total / 2**20:,.1f} MiB, into "
          f"{base}" if missing else f"every file is already in {base}, verified: nothing to download"))
    for src, rel in missing:
        download(hub, src, files[src], os.path.join(base, rel))
    print(f"pulled: --source={stage} --model_tag={tag} --step={step}")
    return stage, tag, step


# export
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.int32: "I32"}
HF_NAMES = [(r"transformer\.wte\.", "model.embed_tokens."), (r"transformer\.h\.(\d+)\.attn\.c_([qkv])\.",
            r"model.layers.\1.self_attn.\2_proj."), (r"transformer\.h\.(\d+)\.attn\.c_proj\.",
            r"model.layers.\1.self_attn.o_proj."), (r"transformer\.h\.(\d+)\.mlp\.c_fc\.", r"model.layers.\1.mlp.fc1."),
            (r"transformer\.h\.(\d+)\.mlp\.c_proj\.", r"model.layers.\1.mlp.fc2.")]  # Nov 2025 -> NanoChatForCausalLM
# nanochat's rendering for completion: system merged into the first user message, then the turns and their specials
CHAT_TEMPLATE = (
    "{%- set ns = namespace(m=messages) -%}{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.m = "
    "[{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + messages[1]['content']}] + messages[2:] -%}"
    "{%- endif -%}<|bos|>{%- for m in ns.m -%}{%- if m['role'] == 'user' -%}<|user_start|>{{ m['content'] }}"
    "<|user_end|>{%- else -%}<|assistant_start|>{%- for p in ([{'type': 'text', 'text': m['content']}] if m['content']"
    " is string else m['content']) -%}{%- if p['type'] == 'python' -%}<|python_start|>{{ p['text'] }}<|python_end|>"
    "{%- elif p['type'] == 'python_output' -%}<|output_start|>{{ p['text'] }}<|output_end|>{%- else -%}{{ p['text'] }}"
    "{%- endif -%}{%- endfor -%}<|assistant_end|>{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}")
WRAPPER = '''"""transformers wrapper of nanochat's GPT (model.py beside it, Chimera's, as it is): trust_remote_code=True.
Generation recomputes the whole sequence at every step (no KV cache); rows must have equal lengths (no padding)."""
from transformers import GenerationMixin, PreTrainedModel, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput

from .model import GPT, GPTConfig

KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")


class NanoChatGPTConfig(PretrainedConfig):
    model_type = "nanochat_gpt"
    attribute_map = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


class NanoChatGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoChatGPTConfig
    base_model_prefix = "gpt"

    def __init__(self, config):
        super().__init__(config)
        self.gpt = GPT(GPTConfig(**{k: getattr(config, k) for k in KEYS}))
        self.post_init()

    def _init_weights(self, module):  # every weight is in the checkpoint: only the rotary tables are computed
        if isinstance(module, GPT):
            module.init_rotary()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("nanochat's GPT takes no padding: give rows of equal length")
        return CausalLMOutput(logits=self.gpt(input_ids))

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
'''


def write_safetensors(path, tensors, metadata):
    """safetensors: an 8-byte little-endian header length, the JSON header {name: {dtype, shape, data_offsets},
    "__metadata__": {str: str}} padded to 8 bytes, then each tensor's raw little-endian bytes in that order."""
    assert sys.byteorder == "little", "safetensors are little-endian; this writer copies memory as it is"
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name], offset = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}, \
            offset + n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(text)) + text)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    atomic_write(path, write, binary=True)


def bpe_parts(ranks, token):
    """How tiktoken makes `token`: BPE over its bytes with the ranks below its own; two parts is its merge."""
    parts, limit = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        rank, i = min((ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
        if rank >= limit:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tokenizer_json(enc):
    """tokenizer.json of a tiktoken Encoding: byte-level BPE (GPT-2's byte-to-unicode alphabet), the merges
    recovered from the ranks, its split pattern, whole pieces in the vocab taken as they are (as tiktoken does)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    alphabet = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(sorted(set(range(256)) - set(keep)))}
    text = lambda token: "".join(alphabet[b] for b in token)
    ranks = enc._mergeable_ranks
    merges = [[text(p[0]), text(p[1])] for t in sorted(ranks, key=ranks.get) if len(t) > 1
              for p in [bpe_parts(ranks, t)] if len(p) == 2]
    return {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for s, i in sorted(enc._special_tokens.items(), key=lambda kv: kv[1])],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {text(t): r for t, r in ranks.items()}, "merges": merges}}


def model_card(source, meta, cfg, out):
    """README.md: the persona's name, the data, the report's figures (when the run left them), how to load it."""
    from openrouter import PERSONA_PATH, load_persona
    try:
        name = load_persona(PERSONA_PATH)["name"]
    except UserError:
        name = "Chimera"
    base, remote = get_base_dir(), cfg.generation == 2026
    counts = []
    for kind in ("sft", "dpo"):
        with contextlib.suppress(OSError), open(os.path.join(base, "datasets", f"trader_{kind}_data.jsonl"), "rb") as f:
            counts.append(f"{sum(1 for line in f if line.strip()):,} {kind.upper()} " +
                          ("conversations" if kind == "sft" else "preference pairs"))
    figures = ""
    with contextlib.suppress(OSError), open(os.path.join(base, "report", "chimera-report.md"), encoding="utf-8") as f:
        figures = (re.search(r"^## Summary\n(.*?)(?=^## |\Z)", f.read(), re.M | re.S) or [""])[-1]
    if not figures:
        with contextlib.suppress(OSError, ValueError), open(os.path.join(
                base, "report", f"chimera-chat-evaluation-{source}.json"), encoding="utf-8") as f:
            results = json.load(f).get("results", {})
            figures = "| metric | value |\n|---|---|\n" + "".join(
                f"| {k} | {v:.4f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in results.items())
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [nanochat, chimera]", "---", "",
        f"# {name}", "", f"A nanochat model ({'2026' if remote else 'Nov 2025'} generation: {cfg.n_layer} layers, "
        f"{cfg.n_embd} wide, vocab {cfg.vocab_size}) given the persona **{name}** by Chimera: SFT on synthetic persona "
        f"conversations, then DPO against the SFT model. Exported from its `{source}` checkpoint, step {meta.get('step')}.",
        "", "## Data", "", "; ".join(counts) + "." if counts else "Chimera's persona data (data/persona.md).", "",
        "## Results", "", figures.strip() or "No report was found beside the checkpoint.", "",
        "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{os.path.basename(os.path.abspath(out))}")',
        f'model = AutoModelForCausalLM.from_pretrained("{os.path.basename(os.path.abspath(out))}"'
        f'{", trust_remote_code=True" if remote else ""})',
        'ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, '
        'return_tensors="pt", return_dict=True)["input_ids"]',
        "print(tok.decode(model.generate(ids, max_new_tokens=128, do_sample=False)[0, ids.size(1):]))", "```", "",
        "The chat template renders a conversation as nanochat does (`<|bos|>`, `<|user_start|>`...); generation "
        "stops at `<|assistant_end|>`." + (" The model is nanochat's own code (model.py), run as remote code." if remote
                                           else ""), ""])


def export(c):
    if not c.out:
        raise UserError("export needs --out=DIR, the folder to write")
    source, out = c.source or "dpo", c.out
    model, tok, meta = load_model(source, "cpu", "eval", c.model_tag, c.step)
    cfg, enc, remote = model.config, tok.enc, model.config.generation == 2026
    ids = {k: tok.encode_special(t) for k, t in (("bos_token_id", "<|bos|>"), ("eos_token_id", "<|assistant_end|>"))}
    state = model.state_dict()
    if remote:  # nanochat's own model: every tensor under its own name
        tensors = {"gpt." + k: v for k, v in state.items()}
        config = {"architectures": ["NanoChatGPTForCausalLM"], "model_type": "nanochat_gpt", "auto_map": {
            "AutoConfig": "modeling_nanochat_gpt.NanoChatGPTConfig",
            "AutoModelForCausalLM": "modeling_nanochat_gpt.NanoChatGPTForCausalLM"}, **dataclasses.asdict(cfg)}
    else:
        tensors = {}
        for k, v in state.items():
            hf = next((re.sub(a, b, k) for a, b in HF_NAMES if re.match(a, k)), k)
            tensors[hf] = v
        config = {"architectures": ["NanoChatForCausalLM"], "model_type": "nanochat", "vocab_size": cfg.vocab_size,
                  "hidden_size": cfg.n_embd, "intermediate_size": 4 * cfg.n_embd, "num_hidden_layers": cfg.n_layer,
                  "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
                  "max_position_embeddings": cfg.sequence_len, "hidden_act": "relu2", "attention_bias": False,
                  "rms_norm_eps": torch.finfo(torch.float32).eps, "final_logit_softcapping": 15.0,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_theta": 10000.0,
                  "tie_word_embeddings": False}
    os.makedirs(out, exist_ok=True)
    if remote:
        import model as modeling
        shutil.copyfile(modeling.__file__, os.path.join(out, "model.py"))
        atomic_write_text(os.path.join(out, "modeling_nanochat_gpt.py"), WRAPPER)
    write_safetensors(os.path.join(out, "model.safetensors"), tensors, {"format": "pt", "source": source,
                                                                       "step": str(meta.get("step"))})
    atomic_write_json(os.path.join(out, "config.json"), {**config, **ids, "pad_token_id": ids["eos_token_id"],
                                                         "dtype": "float32", "use_cache": False})
    atomic_write_json(os.path.join(out, "generation_config.json"), {
        "bos_token_id": ids["bos_token_id"], "pad_token_id": ids["eos_token_id"],
        "eos_token_id": [ids["eos_token_id"], ids["bos_token_id"]], "do_sample": False})
    atomic_write_text(os.path.join(out, "tokenizer.json"), json.dumps(tokenizer_json(enc), ensure_ascii=False))
    atomic_write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
        "pad_token": "<|assistant_end|>", "model_max_length": cfg.sequence_len, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE})
    atomic_write_text(os.path.join(out, "README.md"), model_card(source, meta, cfg, out))
    print(f"exported {source} step {meta.get('step')} ({'2026, remote code' if remote else 'Nov 2025, NanoChatForCausalLM'}"
          f", {sum(t.numel() for t in tensors.values()):,} parameters in {len(tensors)} tensors) to {out}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("pull", "export"):
        if argv and argv[0] not in ("-h", "--help"):
            raise UserError(f"unknown command {argv[0]!r}: expected pull REPO_ID or export --out=DIR (see --help)")
        print(__doc__.strip() + "\n")
        parse_config(Config, ["--help"])
    command, repo = argv[0], argv[1] if argv[0] == "pull" and len(argv) > 1 and not argv[1].startswith("-") else None
    c = parse_config(Config, argv[1 + (repo is not None):], aliases={"i": "source"})
    if c.source is not None and c.source not in SOURCE_DIRS:
        raise UserError(f"--source={c.source!r}: expected one of {', '.join(SOURCE_DIRS)}")
    return pull(repo, c) if command == "pull" else export(c)


if __name__ == "__main__":
    run_main(main)
