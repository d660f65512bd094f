"""
nanochat's tokenizer: a tiktoken Encoding loaded from tokenizer/tokenizer.pkl without trusting the pickle,
and conversations rendered as nanochat renders them (after the one shape check every stage uses).

    tokenizer = get_tokenizer()
    ids, mask = tokenizer.render_conversation({"messages": [...]})   # mask 1: the assistant's tokens
"""

import os
import pickle
from types import SimpleNamespace

import tiktoken

from common import UserError, get_base_dir

SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

# an assistant message's parts: (the special tokens around it, whether the model learns it); a python_output comes
# from the tool at run time: never learned
PARTS = {"text": (None, 1), "python": ("python", 1), "python_output": ("output", 0)}

# nanochat's split pattern (GPT-4's, with numbers split into groups of 1-2 digits)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

class _TokenizerUnpickler(pickle.Unpickler):
    """Admits only tiktoken's Encoding, as a SimpleNamespace holding its state: no pickled code runs."""

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return SimpleNamespace
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only a tiktoken Encoding is allowed")

class Tokenizer:
    """nanochat's tokenizer interface over a tiktoken Encoding."""

    def __init__(self, enc):
        self.enc = enc
        if missing := [t for t in SPECIAL_TOKENS if t not in enc.special_tokens_set]:
            raise UserError(f"tokenizer lacks special tokens {missing}")
        # nanochat's names for the Encoding's methods; encode reads special-token strings as plain text
        self.encode_special, self.encode, self.decode = enc.encode_single_token, enc.encode_ordinary, enc.decode
        self.bos_token_id = self.encode_special("<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        try:
            with open(path, "rb") as f:
                obj = _TokenizerUnpickler(f).load()
        except FileNotFoundError:
            raise UserError(f"{path}: no tokenizer here (train one with nanochat, or make a fresh base)") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise UserError(f"{path}: not a tokenizer pickle nanochat wrote ({e})") from None
        state = vars(obj) if isinstance(obj, SimpleNamespace) else {}
        if not (isinstance(state.get("name"), str) and isinstance(state.get("pat_str"), str) and all(
                isinstance(d, dict) and all(isinstance(k, key_type) and isinstance(v, int) for k, v in d.items())
                for d, key_type in ((state.get("mergeable_ranks"), bytes), (state.get("special_tokens"), str)))):
            raise UserError(f"{path}: not a tiktoken Encoding with name, pat_str, mergeable_ranks and special_tokens")
        try:  # a bad pattern, no ranks, a rank past 32 bits: tiktoken's ValueError or OverflowError
            enc = tiktoken.Encoding(**{k: state[k] for k in ("name", "pat_str", "mergeable_ranks", "special_tokens")})
        except (ValueError, OverflowError, TypeError) as e:
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            raise UserError(f"{path}: not a usable tiktoken Encoding ({why})") from None
        return cls(enc)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def render_conversation(self, conversation, max_tokens=2048):
        """Token ids and a training mask (1 = the assistant's tokens to learn) of a conversation
        {"messages": [...]}, truncated to max_tokens; ValueError if not system?, user, assistant, ..."""
        sp, segments = self.encode_special, [([self.bos_token_id], 0)]  # (tokens, their mask value)
        wrap = lambda name, text: [sp(f"<|{name}_start|>")] + self.encode(text) + [sp(f"<|{name}_end|>")]
        for message in check_messages(conversation):
            content = message["content"]
            if message["role"] == "user":
                segments.append((wrap("user", content), 0))
                continue
            segments.append(([sp("<|assistant_start|>")], 0))
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                name, learn = PARTS[part["type"]]
                segments.append((wrap(name, part["text"]) if name else self.encode(part["text"]), learn))
            segments.append(([sp("<|assistant_end|>")], 1))
        ids = [t for tokens, _ in segments for t in tokens]
        mask = [m for tokens, m in segments for _ in tokens]
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """The prompt to sample the last assistant message: the rest, then <|assistant_start|>."""
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion needs a conversation that ends with an assistant message")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=1 << 62)
        return ids + [self.encode_special("<|assistant_start|>")]

def check_messages(conversation):
    """The one conversation check (tasks.py's too): system?, then user (text) and assistant (text or
    parts) alternating, else ValueError naming the message; a system message is merged into the next."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('conversation has no messages (expected {"messages": [...]})')
    if not all(isinstance(m, dict) for m in messages):
        raise ValueError("every message must be an object {\"role\", \"content\"}")
    offset = int(messages[0].get("role") == "system")
    if offset:
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise ValueError("a system message must be followed by a user message")
        if not all(isinstance(m.get("content"), str) for m in messages[:2]):
            raise ValueError("system and user contents must be strings")
        messages = [dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])] + messages[2:]
    for i, message in enumerate(messages):
        expected, at = ("user" if i % 2 == 0 else "assistant"), i + offset
        if message.get("role") != expected:
            raise ValueError(f"message {at} has role {message.get('role')!r}, expected {expected!r} "
                             "(optional system, then user, assistant, ... alternating)")
        content = message.get("content")
        if expected == "user" and not isinstance(content, str):
            raise ValueError(f"message {at}: user content must be a string")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in PARTS:
                    kind = part.get("type") if isinstance(part, dict) else part
                    raise ValueError(f"message {at}: unknown part type {kind!r}")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"message {at}: part text must be a string")
        elif not isinstance(content, str):
            raise ValueError(f"message {at}: content must be a string or a list of parts")
    return messages

def byte_level_encoding():
    """A tokenizer with no merges: the 256 bytes plus the 9 special tokens (vocab 265)."""
    return tiktoken.Encoding(name="chimera-bytes", pat_str=SPLIT_PATTERN,
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)})

def get_tokenizer(base_dir=None):
    return Tokenizer.from_directory(os.path.join(base_dir or get_base_dir(), "tokenizer"))

