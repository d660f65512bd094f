"""model.py against nanochat's golden fixtures, plus the pieces Chimera adds."""

import json
import os
import pickle
import shutil
import signal
import sys

import pytest
import torch

import checkpoint
import model
import optim
import tokenizer
from checkpoint import load_model, save_checkpoint
from conftest import golden_dir, make_tiny_base, per_token_loss, run_python, run_torchrun
from common import UserError
import engine
from engine import Engine, KVCache, Sampling, use_calculator
from model import GPT, GPTConfig
from tokenizer import SPECIAL_TOKENS


@pytest.fixture(scope="module", params=[2025, 2026])
def gold(request):
    """(golden.json, golden tensors, model, tokenizer, meta) of one nanochat generation's fixture."""
    path = golden_dir(request.param)
    with open(os.path.join(path, "golden.json")) as f:
        g = json.load(f)
    tensors = torch.load(os.path.join(path, "golden_tensors.pt"), weights_only=True)
    m, tok, meta = load_model("base", "cpu", "eval", base_dir=path)
    assert m.config.generation == request.param
    return g, tensors, m, tok, meta


# -----------------------------------------------------------------------------
# Tokenizer


def test_encode_and_special_tokens_match_nanochat(gold):
    g, _, _, tok, _ = gold
    for case in g["encode"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
    assert {t: tok.encode_special(t) for t in SPECIAL_TOKENS} == g["special_tokens"]
    assert tok.get_vocab_size() == g["vocab_size"]
    assert tok.get_bos_token_id() == g["special_tokens"]["<|bos|>"]
    # special-token strings inside text are plain text, not specials
    assert g["special_tokens"]["<|bos|>"] not in tok.encode("<|bos|>")
    assert tok.decode(tok.encode("Unicode: café 你好")) == "Unicode: café 你好"


def test_render_conversation_matches_nanochat(gold):
    g, _, _, tok, _ = gold
    for case in g["render_conversation"]:
        ids, mask = tok.render_conversation(case["conversation"])
        assert ids == case["ids"]
        assert mask == case["mask"]
    case = g["render_conversation_truncated"]
    assert tok.render_conversation(case["conversation"], max_tokens=case["max_tokens"]) == (case["ids"], case["mask"])
    case = g["render_for_completion"]
    assert tok.render_for_completion(case["conversation"]) == case["ids"]


@pytest.mark.parametrize("conversation, message", [
    ({"messages": []}, "no messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "expected 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "expected 'assistant'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}, "followed by a user"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}, "unknown part type"),
    ({"messages": [{"role": "user", "content": ["not", "a", "string"]}]}, "must be a string"),
])
def test_bad_conversations_raise_value_error(gold, conversation, message):
    tok = gold[3]
    with pytest.raises(ValueError, match=message):
        tok.render_conversation(conversation)


def test_hostile_tokenizer_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="refusing to load"):
        tokenizer.Tokenizer.from_directory(str(tok_dir))
    assert not marker.exists()
    # an Encoding whose state smuggles in another object is refused too
    (tok_dir / "tokenizer.pkl").write_bytes(pickle.dumps({"not": "an encoding"}))
    with pytest.raises(UserError, match="tiktoken Encoding"):
        tokenizer.Tokenizer.from_directory(str(tok_dir))


BYTES = {bytes([i]): i for i in range(256)}


@pytest.mark.parametrize("damage", [{"pat_str": "("}, {"mergeable_ranks": {}},
                                    {"mergeable_ranks": {**BYTES, b"ab": 1 << 40}}])
def test_a_damaged_tokenizer_pickle_is_one_line_naming_the_file(tmp_path, damage):
    import copyreg
    import tiktoken
    enc = tokenizer.byte_level_encoding()

    class Damaging(pickle.Pickler):  # the Encoding as nanochat pickles it, with a damaged state
        def reducer_override(self, obj):
            if obj is not enc:
                return NotImplemented
            return copyreg.__newobj__, (tiktoken.Encoding,), {**enc.__getstate__(), **damage}
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        Damaging(f).dump(enc)
    with pytest.raises(UserError) as e:
        tokenizer.Tokenizer.from_directory(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path}/tokenizer.pkl: not a usable tiktoken Encoding") and "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# Model numerics


def test_logits_and_loss_match_nanochat(gold):
    g, t, m, _, _ = gold
    with torch.no_grad():
        logits = m(t["x"])
        assert logits.shape == t["logits"].shape
        assert (logits - t["logits"]).abs().max().item() < 1e-5  # float32 noise on any CPU
        assert torch.allclose(per_token_loss(m, t["x"], t["y"]), t["loss_none"], atol=1e-4)
        loss = per_token_loss(m, t["x"], t["y"])
        assert (loss.sum() / (t["y"] != -1).sum()).item() == pytest.approx(g["loss_mean"], abs=1e-4)
        assert torch.allclose(m.token_logprobs(t["x"], t["y"]).view(-1), -t["loss_none"], atol=1e-4)


def test_2026_structure_matches_nanochat():
    with open(os.path.join(golden_dir(2026), "golden.json")) as f:
        g = json.load(f)
    m = load_model("base", "cpu", "eval", base_dir=golden_dir(2026))[0]
    assert {k: list(v.shape) for k, v in m.state_dict().items()} == {k: v["shape"] for k, v in g["state_dict"].items()}
    assert [[b.attn.window, 0] for b in m.transformer.h] == g["window_sizes"]
    assert [int(i) for i in m.value_embeds] == g["value_embed_layers"] and m.backout_layer == g["backout_layer"]


@pytest.mark.parametrize("case", ["greedy", "greedy_long"])
def test_greedy_decoding_matches_nanochat(gold, case):
    g, _, m, tok, _ = gold
    if case not in g:
        pytest.skip("the Nov 2025 fixture has no long-prompt decode")
    case = g[case]
    ids = list(case["prompt_ids"])
    with torch.no_grad():
        for _ in range(case["max_tokens"]):
            ids.append(m(torch.tensor([ids]))[0, -1].argmax().item())
    assert ids[len(case["prompt_ids"]):] == case["naive_generated"]
    eng = Engine(m, tok)
    row, got = eng.add(case["prompt_ids"], Sampling(temperature=0.0, max_tokens=case["max_tokens"]))[0], []
    while row.live:
        got += [event.token for event in eng.step()]
    assert got == case["engine_generated"]  # stops after <|assistant_end|>, which is an event's token
    seqs, _ = eng.generate_batch(case["prompt_ids"], num_samples=3, max_tokens=case["max_tokens"], temperature=0.0)
    end = [t for t in case["engine_generated"] if t != tok.encode_special("<|assistant_end|>")]
    assert all(s[len(case["prompt_ids"]):] == end for s in seqs)


def test_chunked_logprobs_equal_plain_path_values_and_gradients():
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    m.init_weights(zero_out=False)
    x = torch.randint(0, 300, (3, 40))
    y = torch.randint(0, 300, (3, 40))
    y[0, :10] = -1
    y[2, 25:] = -1

    plain = -per_token_loss(m, x, y).view(3, 40)
    plain = plain.masked_fill(y == -1, 0.0)
    (plain * torch.linspace(0.5, 1.5, 40)).sum().backward()
    plain_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()

    chunked = m.token_logprobs(x, y, chunk_numel=300 * 7)  # 7 rows a chunk: many chunks
    (chunked * torch.linspace(0.5, 1.5, 40)).sum().backward()
    assert torch.allclose(chunked, plain, atol=1e-5)
    assert (chunked[y == -1] == 0).all()
    for name, p in m.named_parameters():
        assert torch.allclose(p.grad, plain_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("pattern", [None, "SL"])
def test_compiled_model_follows_lengths_that_change_every_step(pattern, monkeypatch):
    """--compile: length-grouped batches change width every step; they share one graph (symbolic
    shapes: no recompile, no padding) and match the eager model, forward and backward."""
    from torch._dynamo.utils import counters
    real_compile = torch.compile  # dynamo's graphs and guards, without inductor's minutes of codegen
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    extra = {} if pattern is None else {"window_pattern": pattern}
    m = GPT(GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, **extra))
    m.init_weights(zero_out=False)
    eager = m.hidden_states
    model.compile_model(m)
    for width in (40, 47, 33, 58, 21, 64):
        x = torch.randint(0, 100, (3 if width % 2 else 2, width))
        got = m.hidden_states(x)
        got.sum().backward()
        assert torch.allclose(got, eager(x), atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("pattern", [None, "SL"])
def test_kv_cache_decoding_equals_full_forward(pattern):
    """Chunked prefill and one-token steps through the cache give the full forward's logits,
    past the short window (2026, sequence_len 64: windows 128 > 64 would not bite, so the
    layers here are given narrow windows)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=64, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
                      window_pattern=pattern)).eval()
    m.init_weights(zero_out=False)
    ids = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        if pattern:
            for block, w in zip(m.transformer.h, (5, 9, 64)):
                block.attn.window = w
            m.smear_lambda.fill_(0.7)
        full = m(ids)
        kv = KVCache.for_model(m, 2, 40)
        part = torch.cat([m(ids[:, :12], kv_cache=kv), m(ids[:, 12:15], kv_cache=kv),
                          m(ids[:, 15:16], kv_cache=kv)] + [m(ids[:, t:t + 1], kv_cache=kv) for t in range(16, 30)], dim=1)
        assert torch.allclose(part, full, atol=1e-5)
        assert kv.pos.tolist() == [30, 30]
        # rows at different positions decode independently: row 1 restarts, gets its 12-token
        # prompt alone (a row view), then both rows take one token per forward together
        kv.reset(1)
        m(ids[1:, :12], kv_cache=kv.view(slice(1, 2)))
        assert kv.pos.tolist() == [30, 12]
        steps = [m(torch.tensor([[7], [ids[1, t].item()]]), kv_cache=kv) for t in range(12, 20)]
        row1 = torch.cat([s[1:] for s in steps], dim=1)
        assert torch.allclose(row1, full[1:, 12:20], atol=1e-5)
        row0 = torch.cat([s[:1] for s in steps], dim=1)
        assert torch.allclose(row0, m(torch.cat([ids[:1], torch.full((1, 8), 7)], dim=1))[:, 30:], atol=1e-5)


def test_sampling_is_seeded_and_respects_top_k(gold):
    _, _, m, tok, _ = gold
    prompt = gold[0]["greedy"]["prompt_ids"]
    eng = Engine(m, tok)
    a, _ = eng.generate_batch(prompt, num_samples=4, max_tokens=8, temperature=1.0, top_k=5, seed=3)
    b, _ = eng.generate_batch(prompt, num_samples=4, max_tokens=8, temperature=1.0, top_k=5, seed=3)
    assert a == b
    with torch.no_grad():
        top5 = set(m(torch.tensor([prompt]))[0, -1].topk(5).indices.tolist())
    assert {s[len(prompt)] for s in a} <= top5


# -----------------------------------------------------------------------------
# Calculator tool


def test_calculator_answers_as_nanochats_and_runs_nothing_else():
    """The text the engine inserts (str of the result) and the refusals of nanochat's own use_calculator, on
    expressions of both kinds (golden outputs made by nanochat's function: tests/fixtures/calculator_golden.json):
    models trained by nanochat saw "24.0" for 48/2 and a count for SpellingBee's .count( calls."""
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "calculator_golden.json")) as f:
        cases = json.load(f)["cases"]
    assert len(cases) > 30 and any(want is None for _, want in cases) and any("count" in e for e, _ in cases)
    for expr, want in cases:
        got = use_calculator(expr)
        assert (None if got is None else str(got)) == want, expr
    assert use_calculator("9" * 2000) is None  # longer than any tool call a model writes: no huge numbers
    assert use_calculator("''.__class__.count('a')") is None and use_calculator("'a'.count.__self__") is None


def test_a_tiny_temperature_samples_greedily_for_every_caller():
    """eval.py, onpolicy.py and the server share engine.sample: 1e-300 (a valid flag) would overflow the softmax into
    NaN and stop the run with a traceback; below 1e-4 it is greedy."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    tiny = engine.sample(logits, Sampling(temperature=1e-300), torch.Generator().manual_seed(1))
    assert torch.equal(tiny, engine.sample(logits, Sampling(temperature=0.0), None))


def test_engine_runs_the_calculator_and_forces_its_output(gold, monkeypatch):
    _, _, m, tok, _ = gold
    sp = tok.encode_special
    script = [sp("<|python_start|>")] + tok.encode("6*7") + [sp("<|python_end|>")]
    # the model "writes" the tool call, then <|assistant_end|>; while the tool's output is forced, draws are unused
    scripted = lambda logits, sampling, rng: torch.tensor([script.pop(0) if script else sp("<|assistant_end|>")])
    monkeypatch.setattr(engine, "sample", scripted)
    written = list(script)
    seqs, masks = Engine(m, tok).generate_batch([tok.get_bos_token_id()], max_tokens=40, temperature=0.0)
    out = seqs[0][1:]
    forced = [sp("<|output_start|>")] + tok.encode("42") + [sp("<|output_end|>")]
    assert out == written + forced
    assert masks[0] == [0] + [1] * len(written) + [0] * len(forced)


def test_a_prompts_samples_share_one_prefill_and_rows_decode_as_alone(gold, monkeypatch):
    """n samples: one forward over the prompt, its cache row copied. Prompts with their own settings
    decoding together (each at its own position, sampled with its own rng) give what each gives alone."""
    _, _, m, tok, _ = gold
    prompts = [tok.encode("The market"), tok.encode("A stop-loss order is an order to sell"), tok.encode("Risk")]
    settings = [Sampling(temperature=0.0, max_tokens=12), Sampling(temperature=1.0, top_k=20, seed=5, max_tokens=9),
                Sampling(temperature=0.8, top_p=0.5, seed=7, max_tokens=15)]

    def decode(eng, jobs):
        rows = [eng.add(prompt, sampling, n) for prompt, sampling, n in jobs]
        while any(row.live for group in rows for row in group):
            eng.step()
        return [[row.ids for row in group] for group in rows]

    alone = [decode(Engine(m, tok, max_batch=2), [(p, s, 2)])[0] for p, s in zip(prompts, settings)]
    eng, forwards = Engine(m, tok, max_batch=6), []
    monkeypatch.setattr(eng, "_forward", lambda ids, cache, forward=eng._forward: (forwards.append(len(ids[0])),
                                                                                     forward(ids, cache))[1])
    assert decode(eng, [(p, s, 2) for p, s in zip(prompts, settings)]) == alone
    assert forwards[:3] == [len(p) for p in prompts] and set(forwards[3:]) == {1}  # a prefill per prompt, then steps
    assert alone[0][0] == alone[0][1] and alone[1][0] != alone[1][1]  # greedy twins; sampled rows differ


# -----------------------------------------------------------------------------
# Checkpoints


def fixture_copy(tmp_path, generation):
    """A writable copy of a nanochat fixture base dir, and its checkpoint's (dir, meta path, model path)."""
    base = str(tmp_path / f"nanochat{generation}")
    shutil.copytree(golden_dir(generation), base)
    ckpt = os.path.join(base, "base_checkpoints", "d2")
    step = checkpoint.find_last_step(ckpt)
    return base, os.path.join(ckpt, f"meta_{step:06d}.json"), os.path.join(ckpt, f"model_{step:06d}.pt")


@pytest.mark.parametrize("generation", [2025, 2026])
def test_save_then_load_round_trip_keeps_the_generation(tmp_path, generation):
    """What Chimera saves from a nanochat checkpoint is that generation's format: the same
    model_config keys, state-dict keys and shapes, and the same logits once reloaded."""
    base, meta_path, model_path = fixture_copy(tmp_path, generation)
    m, tok, meta = load_model("base", "cpu", "train", base_dir=base)
    out = os.path.join(base, "chatsft_checkpoints", "chimera_d2")
    save_checkpoint(out, 3, m.state_dict(), dict(meta, step=3, chimera={"stage": "sft"}))
    m2, _, meta2 = load_model("sft", "cpu", "eval", base_dir=base)
    assert m2.config == m.config and meta2["chimera"] == {"stage": "sft"}
    assert meta2["model_config"] == json.load(open(meta_path))["model_config"]
    theirs = torch.load(model_path, weights_only=True)
    ours = torch.load(os.path.join(out, "model_000003.pt"), weights_only=True)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    x = torch.randint(0, tok.get_vocab_size(), (2, 40))
    with torch.no_grad():
        assert torch.equal(m2(x), m.eval()(x))


@pytest.mark.parametrize("generation, change, message", [
    (2025, lambda sd, meta: sd.pop("lm_head.weight"), "missing lm_head.weight"),
    (2026, lambda sd, meta: sd.pop("smear_lambda"), "missing smear_lambda"),
    (2026, lambda sd, meta: sd.pop("value_embeds.1.weight"), "missing value_embeds.1.weight"),
    (2025, lambda sd, meta: sd.update(extra=torch.zeros(1)), "unexpected extra"),
    (2026, lambda sd, meta: sd.update({"transformer.h.0.attn.ve_gate.weight": torch.zeros(4, 12)}),
     "unexpected transformer.h.0.attn.ve_gate.weight"),
    (2026, lambda sd, meta: sd.update({"lm_head.weight": sd["lm_head.weight"][:350]}),
     r"lm_head.weight is \[350, 64\], expected \[384, 64\]"),
    # a Nov 2025 state dict under a 2026 meta
    (2025, lambda sd, meta: meta["model_config"].update(window_pattern="SSSL"),
     "model_config is nanochat 2026's .* the state dict is Nov 2025's"),
    (2026, lambda sd, meta: meta["model_config"].update(window_pattern="SXL"), "not a string of S and L"),
    (2026, lambda sd, meta: meta["model_config"].update(rope_base=10000), "unknown keys rope_base"),
    (2025, lambda sd, meta: meta["model_config"].pop("n_kv_head"), "lacks n_kv_head"),
])
def test_checkpoints_that_fit_neither_generation_fail_with_one_line(tmp_path, generation, change, message):
    base, meta_path, model_path = fixture_copy(tmp_path, generation)
    sd, meta = torch.load(model_path, weights_only=True), json.load(open(meta_path))
    change(sd, meta)
    torch.save(sd, model_path)
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match=message) as e:
        load_model("base", "cpu", "eval", base_dir=base)
    assert "\n" not in str(e.value) and "base_checkpoints" in str(e.value)


def test_2026_weights_under_a_nov_2025_meta(tmp_path, capsys):
    """nanochat 92d63d4 reads a 2026 checkpoint whose model_config lacks window_pattern as all-long
    windows, and adds resid/x0 lambdas (1, 0) when absent: Chimera does the same, saying so."""
    base, meta_path, model_path = fixture_copy(tmp_path, 2026)
    meta = json.load(open(meta_path))
    del meta["model_config"]["window_pattern"]
    json.dump(meta, open(meta_path, "w"))
    sd = torch.load(model_path, weights_only=True)
    del sd["resid_lambdas"]
    torch.save(sd, model_path)
    m = load_model("base", "cpu", "eval", base_dir=base)[0]
    assert m.config.window_pattern == "L" and "window_pattern" in capsys.readouterr().err
    assert [b.attn.window for b in m.transformer.h] == [256, 256] and torch.equal(m.resid_lambdas, torch.ones(2))


def test_fresh_2026_base_is_nanochat_2026(tmp_path):
    base = make_tiny_base(tmp_path, generation=2026, n_embd=64, n_head=4, sequence_len=256)
    m, tok, meta = load_model("base", "cpu", "eval", base_dir=base)
    assert meta["chimera"] == {"stage": "base"} and meta["model_config"]["window_pattern"] == "SSSL"
    assert m.transformer.wte.weight.shape == (320, 64) and tok.get_vocab_size() == 265  # padded to 64
    assert [b.attn.window for b in m.transformer.h] == [128, 256] and list(m.value_embeds) == ["1"]
    assert torch.allclose(m.resid_lambdas, torch.tensor([1.15, 1.05])) and torch.allclose(m.x0_lambdas, torch.tensor([0.2, 0.05]))
    assert m.smear_lambda.item() == 0 and m.backout_lambda.item() == pytest.approx(0.2)
    seqs, _ = Engine(m, tok).generate_batch(tok.encode("hello"), num_samples=2, max_tokens=5, temperature=0.0)
    assert len(seqs) == 2 and seqs[0] == seqs[1]
    m25 = load_model("base", "cpu", "eval", base_dir=make_tiny_base(tmp_path / "old"))[2]
    assert "window_pattern" not in m25["model_config"] and m25["chimera"] == {"stage": "base"}


def test_save_load_round_trip_with_bf16_other_floats_and_orig_mod_prefix(tmp_path):
    base = make_tiny_base(tmp_path)
    m, tok, meta = load_model("base", "cpu", "train", base_dir=base)
    sd = {"_orig_mod." + k: v for k, v in m.state_dict().items()}
    sd["_orig_mod.transformer.wte.weight"] = sd["_orig_mod.transformer.wte.weight"].bfloat16()
    sd["_orig_mod.lm_head.weight"] = sd["_orig_mod.lm_head.weight"].double()  # other floats load as float32
    sd["_orig_mod.transformer.h.0.attn.c_q.weight"] = sd["_orig_mod.transformer.h.0.attn.c_q.weight"].half()
    ckpt = os.path.join(base, "chatsft_checkpoints", "d2")
    save_checkpoint(ckpt, 5, sd, dict(meta, step=5))
    save_checkpoint(ckpt, 12, sd, dict(meta, step=12))
    m2, tok2, meta2 = load_model("sft", "cpu", "eval", base_dir=base)
    assert meta2["step"] == 12 and not m2.training
    assert m2.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(m2.transformer.wte.weight, m.transformer.wte.weight.bfloat16().float())
    assert torch.equal(m2.lm_head.weight, m.lm_head.weight)
    assert torch.equal(m2.transformer.h[0].attn.c_q.weight, m.transformer.h[0].attn.c_q.weight.half().float())
    assert {p.dtype for p in m2.parameters()} == {torch.float32} and m2(torch.tensor([[1, 2, 3]])).isfinite().all()
    assert load_model("sft", "cpu", "eval", step=5, base_dir=base)[2]["step"] == 5
    x = torch.randint(0, tok.get_vocab_size(), (1, 10))
    assert torch.allclose(m2(x), load_model("sft", "cpu", "eval", base_dir=base)[0](x))


def test_load_errors_are_one_clear_line(tmp_path):
    base = make_tiny_base(tmp_path)
    with pytest.raises(UserError, match="mid_checkpoints: no such checkpoint directory; .* holds base_checkpoints$"):
        load_model("mid", "cpu", "eval", base_dir=base)
    with pytest.raises(UserError, match="d9: no such checkpoint directory; .*base_checkpoints holds d2$"):
        load_model("base", "cpu", "eval", model_tag="d9", base_dir=base)
    with pytest.raises(UserError, match=r"no such checkpoint for step 7; .* holds model_000000\.pt$"):
        load_model("base", "cpu", "eval", step=7, base_dir=base)
    with pytest.raises(UserError, match="unknown checkpoint source"):
        load_model("nope", "cpu", "eval", base_dir=base)
    meta_path = os.path.join(base, "base_checkpoints", "d2", "meta_000000.json")
    meta = json.load(open(meta_path))
    meta["model_config"]["vocab_size"] = 999
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match="vocab_size is 999"):
        load_model("base", "cpu", "eval", base_dir=base)
    # the message is a single line
    try:
        load_model("base", "cpu", "eval", base_dir=base)
    except UserError as e:
        assert "\n" not in str(e)


def test_largest_depth_tag_is_the_default(tmp_path):
    base = make_tiny_base(tmp_path, depth=2)
    make_tiny_base(tmp_path, depth=3)
    m, _, meta = load_model("base", "cpu", "eval", base_dir=base)
    assert meta["model_config"]["n_layer"] == 3
    assert load_model("base", "cpu", "eval", model_tag="d2", base_dir=base)[2]["model_config"]["n_layer"] == 2


def test_default_tag_prefers_chimera_then_depth_then_newest(tmp_path):
    for tag in ("zeta", "newest"):
        (tmp_path / tag).mkdir()
        os.utime(tmp_path / tag, (1, 1) if tag == "zeta" else None)
    assert checkpoint.find_largest_model(str(tmp_path)) == "newest"
    for tag in ("d3", "d20"):
        (tmp_path / tag).mkdir()
    assert checkpoint.find_largest_model(str(tmp_path)) == "d20"
    for tag in ("d3_r9", "d20_r2", "d20_r10", "d20_rx"):  # run.sh's on-policy rounds: the last of the largest depth
        (tmp_path / tag).mkdir()
    assert checkpoint.find_largest_model(str(tmp_path)) == "d20_r10"
    for tag in ("chimera_d2", "chimera_d12"):
        (tmp_path / tag).mkdir()
    assert checkpoint.find_largest_model(str(tmp_path)) == "chimera_d12"


KILL_DURING_SAVE = r"""
import os, signal, sys, torch
import checkpoint
base = sys.argv[1]
m, tok, meta = checkpoint.load_model("base", "cpu", "train", base_dir=base)
real_save = torch.save
def dying_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    f.flush()
    f.truncate(f.tell() // 2)   # half a file on disk...
    os.kill(os.getpid(), signal.SIGKILL)  # ...and the process dies mid-save
torch.save = dying_save
checkpoint.save_checkpoint(os.path.join(base, "base_checkpoints", "d2"), 1, m.state_dict(), dict(meta, step=1))
"""


def test_process_killed_mid_save_leaves_previous_checkpoint_latest(tmp_path):
    base = make_tiny_base(tmp_path)
    proc = run_python(["-c", KILL_DURING_SAVE, base], check=False)
    assert proc.returncode == -signal.SIGKILL
    ckpt = os.path.join(base, "base_checkpoints", "d2")
    assert not os.path.exists(os.path.join(ckpt, "model_000001.pt"))
    _, _, meta = load_model("base", "cpu", "eval", base_dir=base)
    assert meta["step"] == 0


# -----------------------------------------------------------------------------
# Optimizers


def test_setup_optimizers_groups_and_lrs():
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=192))
    m.init_weights()
    adamw, muon = optim.setup_optimizers(m)
    scale = (192 / 768) ** -0.5
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.004 * scale, 0.2 * scale])
    assert adamw.param_groups[0]["params"][0] is m.lm_head.weight
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-10
    assert len(muon.param_groups[0]["params"]) == 2 * 6
    assert all(g["initial_lr"] == g["lr"] for opt in (adamw, muon) for g in opt.param_groups)


def test_2026_optimizer_groups_match_nanochat():
    """Every parameter is in the optimizer group, with the hyperparameters, nanochat 92d63d4
    gives it (so SFT/DPO never train a 2026 scalar or embedding with the wrong optimizer)."""
    with open(os.path.join(golden_dir(2026), "golden.json")) as f:
        golden_groups = json.load(f)["optimizer_groups_default"]
    m = load_model("base", "cpu", "train", base_dir=golden_dir(2026))[0]
    names = {p: n for n, p in m.named_parameters()}
    ours = {names[p]: (kind, g) for kind, opt in zip(("adamw", "muon"), optim.setup_optimizers(m)) for g in opt.param_groups
            for p in g["params"]}
    assert set(ours) == set(names.values())
    for want in golden_groups:
        for name in want["params"]:
            kind, group = ours[name]
            assert kind == want["kind"], name
            keys = ("lr", "initial_lr", "eps", "weight_decay") if kind == "adamw" else ("lr", "initial_lr", "momentum", "weight_decay")
            assert {k: group[k] for k in keys} == pytest.approx({k: want[k] for k in keys}), name
            assert kind == "muon" or list(group["betas"]) == want["betas"], name
    assert sum(len(g["params"]) for g in golden_groups) == len(ours)


def test_newton_schulz_orthogonalises():
    G = torch.randn(48, 16)
    X = optim.newton_schulz5(G).float()
    s = torch.linalg.svdvals(X)
    assert X.shape == G.shape
    assert s.min() > 0.5 and s.max() < 1.3  # all singular values pushed close to 1


# -----------------------------------------------------------------------------
# The stages on a nanochat 2026 checkpoint


def test_sft_then_dpo_on_a_2026_checkpoint_in_1_and_2_processes(tmp_path, monkeypatch):
    """SFT from the 2026 fixture's base and DPO from that SFT, each in 1 and 2 processes:
    every checkpoint written is nanochat 2026 (same model_config, keys and shapes) and
    reloads; the 2026-only parameters train too."""
    import dpo
    import sft
    from test_dpo import pairs
    from test_sft import trader_conversation, write_jsonl

    base, meta_path, model_path = fixture_copy(tmp_path, 2026)
    write_jsonl(os.path.join(base, "datasets", "trader_sft_data.jsonl"), [trader_conversation(i) for i in range(24)])
    write_jsonl(os.path.join(base, "datasets", "trader_dpo_data.jsonl"), pairs(24))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    fast = ["--num_iterations=2", "--eval_every=-1", "--device_batch_size=2", "--target_examples_per_step=4"]
    for stage, args in ((sft, ["--sft_dataset=trader", "--eval_batches=1"]),
                        (dpo, ["--source=sft", "--model_tag=one", "--val_fraction=0.2", "--max_length=64"])):
        monkeypatch.setattr(sys, "argv", [stage.__file__, *args, *fast, "--out_tag=one"])
        stage.main()  # one process, in this one
        run_torchrun([stage.__file__, *args, *fast, "--out_tag=two"], env={"NANOCHAT_BASE_DIR": base})
    want_config = json.load(open(meta_path))["model_config"]
    want_shapes = {k: v.shape for k, v in torch.load(model_path, weights_only=True).items()}
    start = load_model("base", "cpu", "eval", base_dir=base)[0].state_dict()
    for source in ("sft", "dpo"):
        for tag in ("one", "two"):
            m, _, meta = load_model(source, "cpu", "eval", model_tag=tag, base_dir=base)
            assert m.config.generation == 2026 and meta["model_config"] == want_config, (source, tag)
            ckpt = checkpoint.checkpoint_dir_for(source, tag, base)
            saved = torch.load(os.path.join(ckpt, f"model_{meta['step']:06d}.pt"), weights_only=True)
            assert {k: v.shape for k, v in saved.items()} == want_shapes
            for name in ("smear_gate.weight", "x0_lambdas", "value_embeds.1.weight", "transformer.h.1.attn.ve_gate.weight"):
                assert not torch.equal(m.state_dict()[name], start[name]), (source, tag, name)


def test_dpo_casts_the_lm_head_once_per_call_under_autocast():
    """A slice of the lm_head misses autocast's cache of cast weights: casting it per answer span cost DPO
    about a quarter of its head time on a GPU. CPU autocast to bf16 shows the count."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.count = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape:
                self.count += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=64, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    m.init_weights(zero_out=False)
    x, y = torch.randint(0, 300, (6, 24)), torch.randint(0, 300, (6, 24))
    for path in ("pair", "score"):
        with torch.autocast("cpu", torch.bfloat16), CountCasts((300, 32)) as casts:
            if path == "pair":  # 3 pairs, chunks of 8 rows: many spans and chunks
                m.pair_loss(x, y, lambda i, margin: -torch.nn.functional.logsigmoid(margin), chunk_numel=300 * 8)
            else:
                with torch.no_grad():
                    m.token_logprobs(x, y, chunk_numel=300 * 8)
        assert casts.count == 1, path


def test_training_keeps_float32_weights_where_evaluation_keeps_bf16(tmp_path, monkeypatch):
    """nanochat stores its embeddings in bf16. Trained in bf16, fused AdamW rounds DPO's embedding steps
    (about 1.5e-3 at d20, below half a bf16 ulp for |w| >= 0.5) away: training loads float32 master weights,
    on every device; evaluation keeps bf16 where the device runs it (CUDA; here CPU stands in)."""
    import checkpoint as ckpt

    base = make_tiny_base(tmp_path / "base")
    path = os.path.join(base, "base_checkpoints", "d2", "model_000000.pt")
    data = torch.load(path, weights_only=True)
    data["transformer.wte.weight"] = data["transformer.wte.weight"].bfloat16()
    torch.save(data, path)
    monkeypatch.setattr(ckpt, "BF16_DEVICES", ("cpu",))
    train, _, _ = load_model("base", "cpu", "train", base_dir=base)
    evaluated, _, _ = load_model("base", "cpu", "eval", base_dir=base)
    assert {p.dtype for p in train.parameters()} == {torch.float32}
    assert evaluated.transformer.wte.weight.dtype == torch.bfloat16
    # the step a bf16 embedding would lose: lr 1.5e-3 on weights of magnitude >= 0.5
    w = train.transformer.wte.weight
    opt = torch.optim.AdamW([w], lr=1.5e-3, betas=(0.8, 0.95), eps=1e-10)
    before, w.grad = w.detach().clone(), torch.ones_like(w)
    opt.step()
    big = before.abs() >= 0.5
    assert big.any() and (w.detach() != before)[big].all()


def test_compiled_windowed_model_keeps_one_graph_per_grad_mode(monkeypatch):
    """2026 at sequence_len 512: the short window (128) bites from 130 tokens on. Lengths on both sides, with
    and without a gradient, take one graph each, and match the eager model."""
    from torch._dynamo.utils import counters
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=512, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                      window_pattern="SL"))
    m.init_weights(zero_out=False)
    eager = m.hidden_states
    model.compile_model(m)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for width in (100, 200, 90, 300, 129, 131):
                x = torch.randint(0, 100, (2, width))
                assert torch.allclose(m.hidden_states(x), eager(x), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2


def _damage(base, what):
    """Damage a copy of the Nov 2025 fixture's checkpoint one way; the files it touches."""
    d = os.path.join(base, "base_checkpoints", "d2")
    model_path, meta_path = os.path.join(d, "model_000000.pt"), os.path.join(d, "meta_000000.json")
    meta = json.load(open(meta_path))
    data = torch.load(model_path, weights_only=True)
    if what == "truncated":
        open(model_path, "r+b").truncate(os.path.getsize(model_path) // 2)
    elif what == "empty":
        open(model_path, "wb").close()
    elif what in ("null", "list", "nested", "latin-1", "directory"):
        os.remove(meta_path)
        if what == "directory":
            os.mkdir(meta_path)
        else:
            text = {"null": "null", "list": "[1, 2]", "nested": "[" * 100000 + "]" * 100000,
                    "latin-1": '{"model_config": "caf\xe9"}'}[what]
            open(meta_path, "wb").write(text.encode("latin-1"))
    elif what.startswith("config:"):
        for item in what[7:].split(","):
            key, value = item.split("=")
            meta["model_config"][key] = json.loads(value)
        json.dump(meta, open(meta_path, "w"))
    elif what in ("int64", "sparse", "expanded", "int key"):
        weight = data["lm_head.weight"]
        data["lm_head.weight"] = {"int64": weight.long(), "sparse": weight.to_sparse(),
                                  "expanded": torch.zeros(1).expand(weight.shape), "int key": weight}[what]
        data.update({7: weight} if what == "int key" else {})
        torch.save(data, model_path)
    elif what == "nan":
        data["transformer.h.1.mlp.c_fc.weight"][3, 4] = float("nan")
        torch.save(data, model_path)
    return model_path, meta_path


@pytest.mark.parametrize("what, names, says", [
    ("truncated", "model", "not a readable checkpoint"), ("empty", "model", "not a readable checkpoint"),
    ("null", "meta", "expected a JSON object, found NoneType"), ("list", "meta", "found list"),
    ("nested", "meta", "RecursionError"), ("latin-1", "meta", "UnicodeDecodeError"), ("directory", "meta", "Error"),
    ("config:n_head=0", "model", "n_head=0 is not a whole number"), ('config:n_head="2"', "model", "n_head='2'"),
    ("config:n_embd=2048.5", "model", "n_embd=2048.5"), ("config:n_layer=1000000", "model", "n_layer=1000000"),
    ("config:n_layer=3", "model", "hold 2 blocks"), ("config:sequence_len=1000000000000", "model", "sequence_len"),
    ("config:n_head=3", "model", "heads must split"), ("int64", "model", "torch.int64"),
    ("config:sequence_len=16384,n_embd=2048,n_head=1,n_kv_head=1", "model", "rotary tables of 335,544,320 values"),
    ("expanded", "model", "lm_head.weight holds 32,768 values in a storage of 4 bytes"),
    ("sparse", "model", "lm_head.weight holds a torch.sparse_coo tensor"), ("int key", "model", "tensors by name"),
    ("nan", "model", "c_fc.weight holds NaN")])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, what, names, says):
    """Before anything is built or allocated from it: a meta is checked against bounds and the weights."""
    base = str(tmp_path / "base")
    shutil.copytree(golden_dir(2025), base)
    model_path, meta_path = _damage(base, what)
    with pytest.raises(UserError) as e:
        load_model("base", "cpu", "eval", base_dir=base)
    message = str(e.value)
    assert "\n" not in message and message.startswith(model_path if names == "model" else meta_path), message
    assert says in message, message


def test_engine_completes_many_prompts_as_each_alone(tmp_path):
    """Engine.complete: prompts join as rows free up (here 2 rows for 3 prompts of different lengths) and each
    gets what decoding it alone gives, greedy and seeded (eval's judged answers, on-policy samples)."""
    from engine import Sampling
    m, tok, _ = load_model("base", "cpu", "eval", base_dir=make_tiny_base(tmp_path / "b", sequence_len=128))
    prompts = [tok.encode(t) for t in ("a", "a longer prompt here", "mid size")]
    for temperature in (0.0, 1.0):
        samplings = [Sampling(temperature, 0, max_tokens=12, seed=7 + i) for i in range(3)]
        together = Engine(m, tok, max_batch=2, max_len=40).complete(prompts, samplings)
        alone = [Engine(m, tok, max_batch=1, max_len=40).complete([p], [s])[0] for p, s in zip(prompts, samplings)]
        assert together == alone and all(len(ids) == 12 for (ids,) in together)


def test_a_base_dir_or_tag_with_glob_characters_is_a_name(tmp_path, monkeypatch):
    """[ and ] in a path are no pattern: the optimizer shards are found, and a run directory's earlier Chimera run is
    cleared and a nanochat checkpoint there refused (unseen, it was neither)."""
    base = str(tmp_path / "base[1]")
    shutil.copytree(golden_dir(2026), base)
    ckpt = os.path.join(base, "base_checkpoints", "d2")
    for rank in (0, 1):
        torch.save({"param_groups": [], "state": {}}, os.path.join(ckpt, f"optim_000020_rank{rank}.pt"))
    assert len(checkpoint.load_optimizer_shards(ckpt, 20)) == 2
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    out = os.path.join(base, "chatsft_checkpoints", "x[y]")
    checkpoint.save_checkpoint(out, 1, {}, {"step": 1, "chimera": {"stage": "sft"}})
    checkpoint.RunDir("sft", "x[y]", True, ("base", None))
    assert os.listdir(out) == []
    checkpoint.save_checkpoint(out, 1, {}, {"step": 1})
    with pytest.raises(UserError, match="meta_000001.json is not a Chimera checkpoint"):
        checkpoint.RunDir("sft", "x[y]", True, ("base", None))


def test_a_full_gpu_is_not_called_a_damaged_checkpoint(tmp_path, monkeypatch):
    """torch.load onto a GPU with no room raises OutOfMemoryError: that is said as such, not as "truncated or
    damaged?" about a good file (every other failure to read it is)."""
    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch, "load", full)
    with pytest.raises(torch.OutOfMemoryError):
        checkpoint.read_pt(str(tmp_path / "model_000001.pt"), "cpu")


def test_held_out_fractions_of_a_damaged_run_meta(tmp_path, monkeypatch):
    """A run meta's user_config that is no object is none (the defaults); a share that is no share in [0, 1) is one
    line naming the flag that overrides it."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for run in (None, [1], "x"):
        assert checkpoint.held_out_fractions("sft", {"user_config": run}) == (0.1, 0.05)
    assert checkpoint.held_out_fractions("dpo", {"user_config": {"val_fraction": 0.2}}) == (0.1, 0.2)
    for value in ("0.2", None, True, float("nan"), 1.5):
        meta = {"user_config": {"trader_val_fraction": value}}
        with pytest.raises(UserError, match="SFT run's meta has user_config trader_val_fraction=.*--sft_val_fraction"):
            checkpoint.held_out_fractions("sft", meta)
        assert checkpoint.held_out_fractions("sft", meta, sft_val_fraction=0.3) == (0.3, 0.05)


def test_sfts_eval_holds_out_what_round_0s_dpo_held_out_not_a_later_rounds(tmp_path, monkeypatch):
    """eval -i sft reads DPO's share from the DPO directory: round 0's (on the persona pairs; a rerun at 0.1), not
    the last on-policy round's that -i dpo loads by default (an earlier run's, at 0.05)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for tag, share in (("d2", 0.1), ("d2_r1", 0.05)):
        os.makedirs(tmp_path / "chatdpo_checkpoints" / tag)
        (tmp_path / "chatdpo_checkpoints" / tag / "model_000010.pt").write_bytes(b"")
        (tmp_path / "chatdpo_checkpoints" / tag / "meta_000010.json").write_text(json.dumps(
            {"step": 10, "user_config": {"val_fraction": share}}))
    assert checkpoint.held_out_fractions("sft", {"user_config": {"trader_val_fraction": 0.1}}) == (0.1, 0.1)


def test_a_damaged_optimizer_shard_or_run_meta_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """The optimizer shards are read as the model file is; a run directory's meta that is not a JSON object
    (null here) is not Chimera's: neither is a traceback."""
    base = str(tmp_path / "base")
    shutil.copytree(golden_dir(2026), base)
    ckpt = os.path.join(base, "base_checkpoints", "d2")
    shard = os.path.join(ckpt, "optim_000020_rank0.pt")
    open(shard, "wb").write(b"\x00" * 10)
    with pytest.raises(UserError) as e:
        checkpoint.load_optimizer_shards(ckpt, 20)
    assert str(e.value).startswith(f"{shard}: not a readable checkpoint") and "\n" not in str(e.value)
    for step in (None, 20.0, "20"):  # the model meta's step
        with pytest.raises(UserError, match=f"{ckpt}: the meta's step is {step!r}, not a whole number"):
            checkpoint.load_optimizer_shards(ckpt, step)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    out = os.path.join(base, "chatsft_checkpoints", "x")
    os.makedirs(out)
    open(os.path.join(out, "model_000001.pt"), "wb").close()
    open(os.path.join(out, "meta_000001.json"), "w").write("null")
    with pytest.raises(UserError, match="meta_000001.json is not a Chimera checkpoint"):
        checkpoint.RunDir("sft", "x", True, ("base", None))
