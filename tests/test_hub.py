"""hub.py: pull against a stand-in Hub on 127.0.0.1 (tree listing, resolve, a CDN on another port, faults), and
export checked with the real transformers against nanochat's golden fixtures of both generations."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import torch

import hub
from checkpoint import load_model
from common import UserError
from conftest import golden_dir, run_python

TOKEN = "hf_test_secret_token_123"


def repo_files(generation, layout):
    """{repo path: bytes} of a golden fixture published flat (model + meta + tokenizer at the root) or as a base dir."""
    root, out = golden_dir(generation), {"README.md": b"# a nanochat model\n"}
    for d, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root)
            if rel.startswith(("tokenizer", "base_checkpoints")):
                out[os.path.basename(rel) if layout == "flat" else rel] = open(os.path.join(d, n), "rb").read()
    return out


class FakeHub:
    """The Hub's API shape: GET /api/models/{repo}/tree/{rev}?recursive=true (paged by Link), GET
    /{repo}/resolve/{rev}/{path}: small files inline, *.pt / *.pkl (LFS) as a 302 to a CDN on another port with
    X-Linked-Etag; 401 for a gated repo without the right token, 404 (X-Error-Code) for unknown repos/revisions.
    Faults: `drop` paths are cut off mid-body once, `corrupt` ones sent with a flipped byte once."""

    def __init__(self):
        self.repos, self.gated, self.drop, self.corrupt, self.log = {}, set(), set(), set(), []
        self.blobs = {}
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), self.handler(kind)) for kind in ("hub", "cdn")]
        for s in self.servers:
            threading.Thread(target=s.serve_forever, daemon=True).start()
        self.url, self.cdn = (f"http://127.0.0.1:{s.server_port}" for s in self.servers)

    def add(self, repo, files, gated=False, revision="main"):
        self.repos.setdefault(repo, {})[revision] = files
        self.gated |= {repo} if gated else set()

    def entry(self, path, data):
        e = {"type": "file", "path": path, "size": len(data),
             "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if path.endswith((".pt", ".pkl")):
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
        return e

    def handler(self, kind):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, code, body=b"", headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                fake.log.append((kind, self.path, dict(self.headers)))
                url = urlparse(self.path)
                if kind == "cdn":
                    return self.serve_blob(url.path.rsplit("/", 1)[-1])
                api = url.path.startswith("/api/models/")
                parts = unquote(url.path).removeprefix("/api/models/" if api else "/").split("/")
                repo, rev, path = "/".join(parts[:2]), parts[3] if len(parts) > 3 else "", "/".join(parts[4:])
                if repo not in fake.repos:
                    return self.send(401 if "Authorization" not in self.headers else 404, b"{}",
                                     [("X-Error-Code", "RepoNotFound"), ("X-Error-Message", "Repository not found")])
                if repo in fake.gated and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self.send(401 if "Authorization" not in self.headers else 403, b"{}",
                                     [("X-Error-Code", "GatedRepo")])
                if rev not in fake.repos[repo]:
                    return self.send(404, b"{}", [("X-Error-Code", "RevisionNotFound")])
                files = fake.repos[repo][rev]
                if api:  # two entries a page, as the Hub pages long listings
                    start = int(parse_qs(url.query).get("cursor", ["0"])[0])
                    names = sorted(files)
                    page = [fake.entry(p, files[p]) for p in names[start:start + 2]] + \
                           ([{"type": "directory", "path": "tokenizer", "oid": "0" * 40, "size": 0}] if not start else [])
                    more = [("Link", f'<{fake.url}{url.path}?recursive=true&cursor={start + 2}>; rel="next"')] \
                        if start + 2 < len(names) else []
                    return self.send(200, json.dumps(page).encode(), more)
                if path not in files:
                    return self.send(404, b"{}", [("X-Error-Code", "EntryNotFound")])
                e = fake.entry(path, files[path])
                if "lfs" not in e:
                    return self.send(200, files[path], [("ETag", f'"{e["oid"]}"')])
                fake.blobs[e["lfs"]["oid"]] = files[path]
                self.send(302, b"", [("Location", f"{fake.cdn}/blobs/{e['lfs']['oid']}?Expires=1&Signature=x"),
                                     ("X-Linked-Etag", f'"{e["lfs"]["oid"]}"'), ("X-Linked-Size", str(len(files[path])))])

            def serve_blob(self, sha):
                data, name = fake.blobs[sha], next(p for files in (r for v in fake.repos.values() for r in v.values())
                                                   for p, d in files.items() if hashlib.sha256(d).hexdigest() == sha)
                start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0])
                body = data[start:]
                if name in fake.corrupt:
                    fake.corrupt.discard(name)
                    body = body[:10] + bytes([body[10] ^ 0xFF]) + body[11:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if name in fake.drop:  # half the body, then the connection drops
                    fake.drop.discard(name)
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return self.connection.shutdown(2)
                self.wfile.write(body)

        return Handler

    def close(self):
        for s in self.servers:
            s.shutdown()
            s.server_close()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    f = FakeHub()
    f.add("karpathy/nanochat-d2", repo_files(2025, "flat"))
    f.add("someone/nanochat2026-d2", repo_files(2026, "basedir"))
    f.add("someone/gated-d2", repo_files(2025, "flat"), gated=True)
    f.add("someone/not-nanochat", {"config.json": b"{}", "model.safetensors": b"\0" * 64})
    monkeypatch.setenv("HF_ENDPOINT", f.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no real token file is read
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    yield f
    f.close()


def pull(repo, *flags):
    return hub.main(["pull", repo, "--backoff=0.01", *flags])


def files_under(root):
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


def golden_logits_match(generation, base):
    model, _, _ = load_model("base", "cpu", "eval", base_dir=base)
    tensors = torch.load(os.path.join(golden_dir(generation), "golden_tensors.pt"), weights_only=True)
    with torch.no_grad():
        assert (model(tensors["x"]) - tensors["logits"]).abs().max().item() < 1e-5


def test_pull_survives_a_dropped_connection_and_a_corrupt_file_and_keeps_the_token_home(fake, tmp_path, monkeypatch,
                                                                                         capfd):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake.drop.add("model_000000.pt")
    fake.corrupt.add("tokenizer.pkl")
    assert pull("karpathy/nanochat-d2") == ("base", "d2", 0)  # base_train's meta (it has depth), d<n_layer>
    base = str(tmp_path / "base")
    src = golden_dir(2025)
    assert files_under(base) == {os.path.join(d, n): open(os.path.join(src, d, n), "rb").read() for d, n in [
        ("tokenizer", "tokenizer.pkl"), ("tokenizer", "token_bytes.pt"), ("base_checkpoints/d2", "model_000000.pt"),
        ("base_checkpoints/d2", "meta_000000.json")]}  # byte-exact, no .part left
    assert not fake.drop and not fake.corrupt  # both faults happened
    cdn = [h for kind, _, h in fake.log if kind == "cdn"]
    assert cdn and all("Authorization" not in h for h in cdn)
    assert any(h.get("Range", "bytes=0-") != "bytes=0-" for h in cdn)  # the dropped file was resumed, not restarted
    assert all(h.get("Authorization") == f"Bearer {TOKEN}" for kind, _, h in fake.log if kind == "hub")
    out = capfd.readouterr()
    assert TOKEN not in out.out + out.err and "pulled: --source=base --model_tag=d2 --step=0" in out.out
    assert not any(TOKEN.encode() in data for data in files_under(str(tmp_path)).values())
    golden_logits_match(2025, base)
    fake.log.clear()  # a second pull downloads nothing: only the listing is asked for
    assert pull("karpathy/nanochat-d2") == ("base", "d2", 0)
    assert {urlparse(p).path.split("/")[5] for _, p, _ in fake.log} == {"tree"}
    assert "nothing to download" in capfd.readouterr().out


def test_pull_base_dir_layout_of_a_2026_model_resumes_a_part_file(fake, tmp_path):
    base = str(tmp_path / "base")
    data = repo_files(2026, "basedir")["base_checkpoints/d2/model_000020.pt"]
    os.makedirs(os.path.join(base, "base_checkpoints", "d2"))
    with open(os.path.join(base, "base_checkpoints", "d2", "model_000020.pt.part"), "wb") as f:
        f.write(data[:1000])  # left by a pull that was stopped
    assert pull("someone/nanochat2026-d2") == ("base", "d2", 20)
    assert [h["Range"] for kind, p, h in fake.log if kind == "cdn" and h["Range"] != "bytes=0-"] == ["bytes=1000-"]
    assert sorted(files_under(base)) == ["base_checkpoints/d2/meta_000020.json", "base_checkpoints/d2/model_000020.pt",
                                         "tokenizer/token_bytes.pt", "tokenizer/tokenizer.pkl"]
    golden_logits_match(2026, base)


def test_pull_refuses_a_second_tokenizer_and_a_different_model(fake, tmp_path):
    base = str(tmp_path / "base")
    pull("karpathy/nanochat-d2")
    before = files_under(base)
    with pytest.raises(UserError, match=r"tokenizer.pkl is already there and differs from someone/nanochat2026-d2's "
                                        r"tokenizer/tokenizer.pkl: .*NANOCHAT_BASE_DIR .*\(a base dir holds one tokenizer"):
        pull("someone/nanochat2026-d2")
    assert files_under(base) == before  # nothing mixed in
    fake.add("karpathy/nanochat-d2", dict(repo_files(2025, "flat"), **{"model_000000.pt": b"other weights"}), revision="v2")
    with pytest.raises(UserError, match="model_000000.pt is already there and differs"):
        pull("karpathy/nanochat-d2", "--revision=v2")


def test_pull_picks_by_source_tag_and_step_and_reads_the_token_file(fake, tmp_path):
    files = repo_files(2025, "flat")
    meta = json.loads(files["meta_000000.json"])
    del meta["user_config"]  # no base_train --depth
    fake.add("someone/gated-d2", dict(files, **{"meta_000000.json": json.dumps(meta).encode(), "model_000005.pt": b"x"}))
    os.makedirs(tmp_path / "hf_home")
    (tmp_path / "hf_home" / "token").write_text(TOKEN + "\n")  # as `hf auth login` leaves it
    assert pull("someone/gated-d2") == ("sft", "d2", 0)  # not base_train's meta: a chat model, SFT's
    with pytest.raises(UserError, match=r"no nanochat checkpoint .* with --source=mid --step=3; it holds README.md"):
        pull("someone/gated-d2", "--source=mid", "--step=3")
    assert pull("someone/gated-d2", "--source=mid", "--model_tag=d7", "--step=0") == ("mid", "d7", 0)
    model, _, _ = load_model("mid", "cpu", "eval", "d7")
    assert model.config.n_layer == 2


@pytest.mark.parametrize("repo, flags, message", [
    ("someone/gated-d2", [], "gated or private: set HF_TOKEN"),
    ("nobody/nothing", [], r"no such repo \(or it is private: set HF_TOKEN"),
    ("karpathy/nanochat-d2", ["--revision=nope"], "no revision 'nope'"),
    ("someone/not-nanochat", [], "no nanochat checkpoint .*; it holds config.json, model.safetensors"),
])
def test_pull_errors_are_one_line(fake, repo, flags, message):
    with pytest.raises(UserError, match=message):
        pull(repo, *flags)


def test_pull_cli_wrong_token_exits_2_with_one_line(fake, tmp_path):
    proc = run_python(["hub.py", "pull", "someone/gated-d2", "--retries=0"], check=False,
                      env={"HF_TOKEN": "hf_wrong", "HF_ENDPOINT": fake.url, "HF_HOME": str(tmp_path)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "this token has no access" in proc.stderr
    assert "hf_wrong" not in proc.stderr + proc.stdout
    assert "export" in run_python(["hub.py", "--help"]).stdout


# export, with the real transformers
@pytest.fixture(scope="module", params=[2025, 2026])
def exported(request, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    base, out = golden_dir(request.param), str(tmp_path_factory.mktemp("export") / f"nanochat{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", base)
        hub.main(["export", "-i", "base", "--out", out])
        ours, tok, _ = load_model("base", "cpu", "eval", base_dir=base)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                                    output_loading_info=True)
    assert not any(info.values()), info  # every weight is the checkpoint's: none missing, unexpected or mismatched
    model.eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    with open(os.path.join(base, "golden.json")) as f:
        golden = json.load(f)
    return request.param, out, model, hf_tok, ours, tok, golden


def test_export_logits_match_nanochat(exported):
    generation, out, model, _, ours, _, _ = exported
    assert type(model).__name__ == ("NanoChatForCausalLM" if generation == 2025 else "NanoChatGPTForCausalLM")
    tensors = torch.load(os.path.join(golden_dir(generation), "golden_tensors.pt"), weights_only=True)
    with torch.no_grad():
        diff = (model(tensors["x"]).logits.float() - tensors["logits"]).abs().max().item()
    assert diff < (1e-2 if generation == 2025 else 1e-4), diff
    import safetensors.torch
    saved = safetensors.torch.load_file(os.path.join(out, "model.safetensors"))  # no tensor dropped
    assert len(saved) == len(ours.state_dict()) and sum(t.numel() for t in saved.values()) == sum(
        t.numel() for t in ours.state_dict().values())


def test_export_greedy_generation_matches_nanochat(exported):
    generation, _, model, _, _, _, golden = exported
    # nanochat 885a4f2 rotates with bf16-rounded tables, transformers with float32 ones, which flips a near-tie of this
    # random model's logits: rounded as nanochat rounds them, its greedy decoding is nanochat's token for token
    rotary = model.model.rotary_emb if generation == 2025 else None
    if rotary is not None:
        rotary.forward = lambda x, position_ids, f=rotary.forward: tuple(t.bfloat16().float() for t in f(x, position_ids))
    try:
        check_greedy(model, golden)
    finally:
        if rotary is not None:
            del rotary.forward


def check_greedy(model, golden):
    for case in [golden["greedy"]] + ([golden["greedy_long"]] if "greedy_long" in golden else []):
        prompt = torch.tensor([case["prompt_ids"]])
        for use_cache in (True, False):  # no stopping: nanochat's naive generate
            naive = model.generate(prompt, max_new_tokens=case["max_tokens"], do_sample=False, eos_token_id=None,
                                   use_cache=use_cache, min_new_tokens=case["max_tokens"])[0, prompt.size(1):]
            assert naive.tolist() == case["naive_generated"]
        # generation_config.json's stops (<|assistant_end|>, <|bos|>, the stop included): nanochat's Engine
        assert model.generate(prompt, max_new_tokens=case["max_tokens"])[0, prompt.size(1):].tolist() == \
            case["engine_generated"]


def test_export_tokenizer_and_chat_template_match_nanochat(exported):
    _, out, _, hf_tok, _, tok, golden = exported
    texts = [c["text"] for c in golden["encode"]] + [
        "Prices: 12345678 and 3.14159, 2024-06-01!", "naïve café — 東京 🚀 emoji 👍🏽 and Ελληνικά", "   spaces    "
        "runs\n\n\n  \t\t tabs\r\n\r\nend  ", "don't you'll WE'RE it's", "x" * 50 + " 1 22 333 4444", ""]
    for text in texts:  # nanochat reads special-token strings in text as text: transformers does when told to
        assert hf_tok(text, split_special_tokens=True)["input_ids"] == tok.encode(text), text
        assert "<|" in text or hf_tok.encode(text) == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == text
    case = golden["render_for_completion"]
    ids = hf_tok.apply_chat_template(case["conversation"]["messages"][:-1], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
    assert ids == case["ids"] == tok.render_for_completion(case["conversation"])
    for case in golden["render_conversation"]:  # tool-use parts and a system message too
        ids = hf_tok.apply_chat_template(case["conversation"]["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert ids == case["ids"]


def test_export_folder_has_no_pickle_and_a_model_card(exported):
    generation, out, *_ = exported
    names = sorted(os.listdir(out))
    assert names == sorted(["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                            "tokenizer_config.json"] + (["model.py", "modeling_nanochat_gpt.py"] if generation == 2026
                                                        else []))
    for name in names:
        with open(os.path.join(out, name), "rb") as f:
            head = f.read(4)
        assert not head.startswith((b"\x80", b"PK\x03\x04")), name  # neither a pickle nor torch.save's zip
    if generation == 2026:  # the model definition travels as it is
        assert open(os.path.join(out, "model.py")).read() == open(hub.__file__.replace("hub.py", "model.py")).read()
    card = open(os.path.join(out, "README.md")).read()
    assert "# Chimera" in card and "library_name: transformers" in card and "{" + "name}" not in card
    snippet = card.split("```python\n")[1].split("```")[0].replace(f'"{os.path.basename(out)}"', repr(out))
    snippet = snippet.replace("max_new_tokens=128", "max_new_tokens=8")  # (a quicker run of the same code)
    with contextlib.redirect_stdout(io.StringIO()):  # the card's own example runs as written
        exec(snippet, {})
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == ("nanochat" if generation == 2025 else "nanochat_gpt")


def test_export_model_card_carries_the_persona_data_and_report(tmp_path, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(golden_dir(2025), base)
    (base / "datasets").mkdir()
    (base / "datasets" / "trader_sft_data.jsonl").write_text('{"a": 1}\n{"a": 2}\n{"a": 3}\n')
    (base / "report").mkdir()
    (base / "report" / "chimera-chat-evaluation-base.json").write_text(json.dumps({"results": {"ARC-Easy": 0.25}}))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    out = tmp_path / "out"
    hub.main(["export", "-i", "base", "--out", str(out)])
    card = (out / "README.md").read_text()
    assert "3 SFT examples" in card and "| ARC-Easy | 0.2500 |" in card and "Nov 2025 generation, 2 layers" in card
    (base / "report" / "chimera-report.md").write_text("## Summary\n\n| Metric | SFT | DPO |\n|--|--|--|\n| x | 1 | 2 |\n"
                                                       "\n## Next\nnot this\n")
    hub.main(["export", "-i", "base", "--out", str(out)])
    card = (out / "README.md").read_text()
    assert "| x | 1 | 2 |" in card and "not this" not in card and "ARC-Easy" not in card
