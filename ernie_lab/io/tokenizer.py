"""Text <-> token ids for ERNIE 4.5: a SentencePiece model plus a table of special tokens.

A SentencePiece BPE model cuts text into pieces from a learned list (``▁the``, ``ing``, ``:``);
byte fallback gives every UTF-8 byte a piece too, so any text encodes and ``decode(encode(t)) == t``.
Special tokens (chat markers, image and video slots) are never produced from ordinary text by the
model: the tokenizer cuts them out of the text first and looks their ids up in a table.

ERNIE's twist: the special tokens sit far above the ordinary pieces (``<|begin_of_sentence|>`` is
100273, the image slot 100295) and the model's embedding has 103,424 rows, more than there are
tokens, so some ids are simply unused. Those are the big checkpoints' ids (the table in
``special_tokens.py``); a folder's own tokenizer files may put the special tokens elsewhere (a small
model's compact vocabulary), and then theirs count. The chat format (``chat_format.py``) is plain
text around two markers: ``<|begin_of_sentence|>{system}\\nUser: {question}\\nAssistant: {answer}<|end_of_sentence|>``.

``load_tokenizer`` reads a checkpoint folder (or a Hub id from the local Hugging Face cache). When
no real ``tokenizer.model`` is at hand it falls back, with a warning, to the kit's stand-in: a small
model trained on Python's own help texts (``scripts/train_stand_in_tokenizer.py``) that carries the
same special tokens at the same ids, so everything downstream works unchanged.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import warnings
from pathlib import Path

import sentencepiece as spm

from .chat_format import check_messages, render_chat
from .reasoning import THINK_OPEN, TURN_END
from ..errors import CheckpointError, InputError
from ..model.special_tokens import BEGIN_OF_SENTENCE, END_OF_SENTENCE, ROLE_NAMES, SPECIAL_TOKENS, TOKEN_ROLES

MODEL_VOCAB_SIZE = 103_424  # rows of ERNIE 4.5's embedding (config.json "vocab_size")

# The special-token table, its sources and the role names live in special_tokens.py; these names stay for callers.
ERNIE_SPECIAL_TOKENS = SPECIAL_TOKENS  # text -> id of the big checkpoints (a folder's own files override them)
ERNIE_TOKEN_ROLES = TOKEN_ROLES        # role -> token text, as Baidu's tokenizer_config.json names them

STAND_IN_MODEL = Path(__file__).resolve().parents[1] / "data" / "tokenizer" / "stand_in.model"
STAND_IN_WARNING = "using the ernie-lab stand-in tokenizer, not the real ERNIE vocabulary"
RESERVED_NAME = "<|reserved_{}|>"  # the name of an id that no token uses


class StandInTokenizerWarning(UserWarning):
    """The kit fell back to its stand-in tokenizer: ordinary text gets different ids than in real ERNIE."""


# ---------------------------------------------------------------------------------------- tokenizer
def check_encodable(text: str) -> None:
    """An InputError naming the position of a lone surrogate (text read with errors="surrogateescape", or a
    JSON "\\ud83d" escape split from its pair): UTF-8, and so SentencePiece, cannot hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"the text holds {text[err.start]!r} at character {err.start}, a lone UTF-16 surrogate that "
                         "UTF-8 cannot encode; fix the text (e.g. text.encode('utf-16', 'surrogatepass')"
                         ".decode('utf-16') joins a split pair).") from None


class ErnieTokenizer:
    """A SentencePiece model for ordinary text plus a table of special tokens, in one id space.

    ids below ``sp.vocab_size()`` are SentencePiece pieces; special tokens may sit anywhere in
    ``range(vocab_size)``; every other id is reserved and decodes to nothing.
    """

    def __init__(self, sp: spm.SentencePieceProcessor, special_tokens: dict[str, int], roles: dict[str, str],
                 vocab_size: int, *, chat_template: str | None = None, add_bos_token: bool = False,
                 add_eos_token: bool = False, source: str = "", is_stand_in: bool = False):
        self.sp = sp
        self.num_pieces = sp.vocab_size()  # ids below this are SentencePiece pieces
        self.special_tokens = dict(special_tokens)                          # text -> id
        self.special_ids = {i: t for t, i in self.special_tokens.items()}  # id -> text (last name wins)
        self.roles = {role: text for role, text in roles.items() if text in self.special_tokens}
        self.vocab_size = vocab_size
        self.chat_template = chat_template  # the checkpoint's jinja text; None: ERNIE 4.5's text format
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.source, self.is_stand_in = source, is_stand_in
        # Longest first, so "<|IMAGE_START|>" is never read as a shorter token that prefixes it.
        names = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")")

    # ids of the named roles; None when the tokenizer has no such token
    def _role_id(self, role: str) -> int | None:
        text = self.roles.get(role)
        return None if text is None else self.special_tokens[text]

    bos_token_id = property(lambda self: self._role_id("bos_token"))
    eos_token_id = property(lambda self: self._role_id("eos_token"))
    unk_token_id = property(lambda self: self._role_id("unk_token"))
    pad_token_id = property(lambda self: self._role_id("pad_token"))
    cls_token_id = property(lambda self: self._role_id("cls_token"))
    sep_token_id = property(lambda self: self._role_id("sep_token"))

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a reply, where the real checkpoints stop: </s>, <|end_of_sentence|> (closes an assistant
        turn of the text and VL formats) and, in a tokenizer that has it, <|im_end|> (closes one in the
        21B-A3B-Thinking template). The reasoning tags <think> ... </response> never stop a reply."""
        ids = [self.eos_token_id, self.sep_token_id, self.special_tokens.get(TURN_END)]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        kind = "stand-in" if self.is_stand_in else "real"
        return (f"ErnieTokenizer({kind}, {self.num_pieces:,} pieces + {len(self.special_tokens)} special "
                f"tokens in {self.vocab_size:,} ids, from {self.source})")

    # ----------------------------------------------------------------------------- text -> ids
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings inside it (``<|begin_of_sentence|>``) become their ids.

        ``add_special_tokens`` adds <s> / </s> only where the checkpoint's tokenizer_config.json asks for
        them (``add_bos_token`` / ``add_eos_token``); ERNIE 4.5 asks for neither.
        """
        if not isinstance(text, str):
            raise InputError(f"encode wants a str, got {type(text).__name__}. Decode ids with tok.decode(ids).")
        check_encodable(text)
        ids = []
        for chunk in self._special_re.split(text):  # odd positions hold the special tokens
            if chunk in self.special_tokens:
                ids.append(self.special_tokens[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if add_special_tokens and self.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    # ----------------------------------------------------------------------------- ids -> text
    def decode(self, ids, skip_special_tokens: bool = False, keep: tuple[str, ...] = ()) -> str:
        """The text of ``ids`` (a list of ints or a 1-D tensor). Reserved ids decode to nothing.

        ``keep``: special tokens written even with ``skip_special_tokens`` (``<think>``, ``</think>``, so
        ``reasoning.split_reasoning`` can still find the reasoning block).
        """
        ids = self._check_ids(ids)
        if isinstance(keep, str) or not all(isinstance(token, str) for token in keep):
            raise InputError(f"decode: keep must be a tuple of token texts like ('<think>',), got {keep!r}.")
        parts, run = [], []  # run: consecutive SentencePiece ids, decoded together so bytes rejoin
        for i in ids:
            if i in self.special_ids:
                parts.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens or self.special_ids[i] in keep:
                    parts.append(self.special_ids[i])
            elif i < self.num_pieces:
                run.append(i)
        parts.append(self.sp.decode(run))
        return "".join(parts)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        """Id of a token name (a special token, a piece like ``▁the`` or ``<0x0A>``), or of each name in a list."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        if isinstance(tokens, (list, tuple)):
            return [self._token_to_id(t) for t in tokens]
        raise InputError(f"convert_tokens_to_ids wants a str or a list of str, got {type(tokens).__name__}.")

    def convert_ids_to_tokens(self, ids) -> str | list[str]:
        """Name of each id: the special token, the SentencePiece piece, or ``<|reserved_N|>``."""
        if isinstance(ids, numbers.Integral) and not isinstance(ids, bool):
            return self._id_to_token(self._check_ids([ids])[0])
        return [self._id_to_token(i) for i in self._check_ids(ids)]

    def _token_to_id(self, token) -> int:
        if not isinstance(token, str):
            raise InputError(f"token names are str, got {type(token).__name__} ({token!r}).")
        if token in self.special_tokens:
            return self.special_tokens[token]
        piece_id = self.sp.piece_to_id(token)  # SentencePiece answers <unk>'s id for names it lacks
        if self.sp.id_to_piece(piece_id) == token:
            return piece_id
        reserved = re.fullmatch(RESERVED_NAME.format(r"(\d+)").replace("|", r"\|"), token)
        if reserved and self._id_to_token(int(reserved[1])) == token:
            return int(reserved[1])
        raise InputError(f"{token!r} is not a token of this tokenizer ({self.source}). Pieces look like '▁the' "
                         f"or '<0x0A>'; special tokens are {sorted(self.special_tokens)}.")

    def _id_to_token(self, i: int) -> str:
        if i in self.special_ids:
            return self.special_ids[i]
        return self.sp.id_to_piece(i) if i < self.num_pieces else RESERVED_NAME.format(i)

    def _check_ids(self, ids) -> list[int]:
        if hasattr(ids, "ndim") and hasattr(ids, "tolist"):  # torch.Tensor or numpy array
            if ids.ndim != 1:
                raise InputError(f"decode takes one sequence (a 1-D tensor), got shape {tuple(ids.shape)}; "
                                 "decode each row separately.")
            if "int" not in str(ids.dtype):
                raise InputError(f"token ids must be integers, got a tensor of dtype {ids.dtype}.")
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            raise InputError(f"decode wants a list of ints or a 1-D tensor, got {type(ids).__name__}.")
        bad = [i for i in ids if not isinstance(i, numbers.Integral) or isinstance(i, bool)]
        if bad:
            raise InputError(f"token ids must be ints, got {bad[0]!r} ({type(bad[0]).__name__}).")
        outside = [int(i) for i in ids if not 0 <= i < self.vocab_size]
        if outside:
            raise InputError(f"token id {outside[0]} is outside this tokenizer's range 0..{self.vocab_size - 1}.")
        return [int(i) for i in ids]

    # ----------------------------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = True,
                            enable_thinking: bool | None = None) -> list[int] | str:
        """A conversation in ERNIE 4.5's chat format: token ids, or the text itself with ``tokenize=False``.

        ``messages`` are dicts with ``role`` (system, user, assistant) and ``content``. With
        ``add_generation_prompt`` the text ends in ``"Assistant: "`` so the model writes the reply.
        A checkpoint that ships its own jinja template is rendered with it; otherwise the text model's
        format is written out in ``format_ernie_chat``. ``enable_thinking`` is handed to the checkpoint's
        template (the thinking models read it); True is refused for a template that never writes ``<think>``
        (the text models' format: they have no thinking mode, see ``reasoning.py``).
        """
        if enable_thinking and THINK_OPEN not in (self.chat_template or ""):
            raise InputError("enable_thinking=True, but this tokenizer's chat template has no thinking mode: the "
                             "ERNIE 4.5 text models (0.3B, 21B-A3B, 300B-A47B) never think. Leave it out, use "
                             "ERNIE-4.5-21B-A3B-Thinking, or a VL model through processor.VLProcessor.")
        if self.chat_template is None:
            text = format_ernie_chat(messages, add_generation_prompt,
                                     cls_token=self.roles.get("cls_token", BEGIN_OF_SENTENCE),
                                     sep_token=self.roles.get("sep_token", END_OF_SENTENCE))
        else:
            text = render_chat_template(self.chat_template, messages, add_generation_prompt,
                                        enable_thinking=enable_thinking, **self.roles)
        return self.encode(text) if tokenize else text


def format_ernie_chat(messages: list[dict], add_generation_prompt: bool = True, *,
                      cls_token: str = BEGIN_OF_SENTENCE, sep_token: str = END_OF_SENTENCE) -> str:
    """ERNIE 4.5's text chat format, the string Baidu's chat template renders (tests/test_tokenizer.py checks):

        <|begin_of_sentence|>You are terse.\\nUser: Hi\\nAssistant: Hello.<|end_of_sentence|>User: Bye\\nAssistant: 

    Content must be str; ``chat_format.render_chat`` writes the text (the VL format is the same with pictures).
    """
    return render_chat(messages, add_generation_prompt, pictures=False, cls_token=cls_token, sep_token=sep_token)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         enable_thinking: bool | None = None, **special_tokens: str) -> str:
    """Render a checkpoint's jinja chat template the way transformers does (sandboxed, trimmed blocks)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    check_messages(messages, roles=None)  # the template decides which roles and items it renders

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    context = dict(special_tokens, messages=messages, add_generation_prompt=add_generation_prompt)
    if enable_thinking is not None:  # left undefined otherwise: templates test "enable_thinking is defined"
        context["enable_thinking"] = enable_thinking
    try:
        return env.from_string(template).render(**context)
    except jinja2.exceptions.TemplateError as err:
        raise InputError(f"the checkpoint's chat template could not render these messages: {err}") from None


# ------------------------------------------------------------------------------------------ loading
def load_tokenizer(source: str | os.PathLike | None = None) -> ErnieTokenizer:
    """The tokenizer of a checkpoint folder or Hub id, or the kit's stand-in.

    ``source`` is a local folder, a Hub id such as ``baidu/ERNIE-4.5-0.3B-PT`` (looked up in the local
    Hugging Face cache only, under HF_HOME; the network is never used), or None / ``"stand-in"``.
    A folder without ``tokenizer.model`` gives the stand-in, with a StandInTokenizerWarning.
    """
    if source is None or source == "stand-in":
        return load_stand_in("asked for")
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"load_tokenizer wants a folder, a Hub id or None, got {type(source).__name__}.")
    folder, why_not = resolve_tokenizer_folder(source)
    if folder is None:
        return load_stand_in(why_not)
    if not (folder / "tokenizer.model").is_file():
        json_only = (folder / "tokenizer.json").is_file()
        note = " (it has a tokenizer.json, which ernie-lab does not read)" if json_only else ""
        return load_stand_in(f"{folder} has no tokenizer.model{note}")
    return load_folder(folder)


def resolve_tokenizer_folder(source: str | os.PathLike) -> tuple[Path | None, str]:
    """(folder, "") for a local folder or a cached Hub id; (None, reason) when the cache lacks the repo."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path, ""
    if path.exists():
        raise InputError(f"{path} is a file; load_tokenizer wants the folder that holds tokenizer.model.")
    if isinstance(source, os.PathLike) or str(source).startswith((".", "/", "~")):
        raise InputError(f"the folder {path} does not exist.")
    repo_id = str(source)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise InputError(f"{source!r} is neither an existing folder nor a Hub id like 'baidu/ERNIE-4.5-0.3B-PT'.")
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True)), ""
    except Exception as err:  # not in the cache (LocalEntryNotFoundError) or an unreadable cache entry
        return None, f"{repo_id} is not in the local Hugging Face cache {cache} ({type(err).__name__})"


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads, read from the environment now (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def load_stand_in(reason: str) -> ErnieTokenizer:
    """The kit's stand-in: a small SentencePiece model with ERNIE's special tokens at their real ids."""
    warnings.warn(f"{STAND_IN_WARNING} ({reason}). Ordinary text gets different ids than in ERNIE 4.5; "
                  "special tokens keep their real ids.", StandInTokenizerWarning, stacklevel=3)
    sp = read_sentencepiece(STAND_IN_MODEL)
    specials = {**sentencepiece_specials(sp), **ERNIE_SPECIAL_TOKENS}
    return ErnieTokenizer(sp, specials, ERNIE_TOKEN_ROLES, MODEL_VOCAB_SIZE,
                          source=f"stand-in {STAND_IN_MODEL.name}", is_stand_in=True)


def load_folder(folder: Path) -> ErnieTokenizer:
    """A real tokenizer: tokenizer.model plus the special tokens the Hub's JSON files declare."""
    sp = read_sentencepiece(folder / "tokenizer.model")
    config = read_json(folder / "tokenizer_config.json")
    token_map = read_json(folder / "special_tokens_map.json")
    specials = sentencepiece_specials(sp)
    specials.update(declared_added_tokens(folder, config))

    roles = {}  # bos_token, cls_token, ..., and ERNIE's own names such as sys_start_token
    for role in [*ROLE_NAMES, *(key for key in config if key.endswith("_token") and key not in ROLE_NAMES)]:
        text = token_text(config.get(role, token_map.get(role)))
        if text is not None and resolve_token(text, sp, specials) is not None:
            roles[role] = text
    for source in (config, token_map):
        extra = source.get("additional_special_tokens") or []
        for text in map(token_text, extra if isinstance(extra, list) else [extra]):
            if text is not None:
                resolve_token(text, sp, specials)

    vocab_size = max([sp.vocab_size(), *(i + 1 for i in specials.values())])
    model_vocab = read_json(folder / "config.json").get("vocab_size")
    if isinstance(model_vocab, int):
        if model_vocab < vocab_size:
            raise CheckpointError(f"{folder / 'config.json'} says vocab_size {model_vocab}, but the tokenizer uses ids "
                                  f"up to {vocab_size - 1}. The tokenizer and the model do not belong together.")
        vocab_size = model_vocab
    return ErnieTokenizer(sp, specials, roles, vocab_size, chat_template=read_chat_template(folder, config),
                          add_bos_token=bool(config.get("add_bos_token", False)),
                          add_eos_token=bool(config.get("add_eos_token", False)), source=str(folder))


def declared_added_tokens(folder: Path, config: dict) -> dict[str, int]:
    """text -> id from added_tokens.json and tokenizer_config.json's "added_tokens_decoder" (Hub formats)."""
    added = {}
    added_file = folder / "added_tokens.json"
    for text, i in read_json(added_file).items():
        if not isinstance(i, int) or i < 0:
            raise CheckpointError(f"{added_file} maps {text!r} to {i!r}; ids must be non-negative ints.")
        added[text] = i
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder should map ids to tokens, "
                              f"found a {type(decoder).__name__}.")
    for key, entry in decoder.items():
        text = token_text(entry)
        if not str(key).isdigit() or text is None:
            raise CheckpointError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder entry {key!r}: {entry!r} "
                                  "is not an id with a 'content'.")
        added[text] = int(key)
    return added


def sentencepiece_specials(sp: spm.SentencePieceProcessor) -> dict[str, int]:
    """The pieces SentencePiece never produces from text (<unk>, <s>, </s>, control tokens)."""
    return {sp.id_to_piece(i): i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)}


def resolve_token(text: str, sp: spm.SentencePieceProcessor, specials: dict[str, int]) -> int | None:
    """Id of a declared special token, from the added tokens or the SentencePiece pieces; None if neither."""
    if text not in specials:
        piece_id = sp.piece_to_id(text)
        if sp.id_to_piece(piece_id) != text:
            return None
        specials[text] = piece_id
    return specials[text]


def token_text(entry) -> str | None:
    """A token as the Hub files write it: "<s>" or {"content": "<s>", ...}."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) and entry else None


def read_chat_template(folder: Path, config: dict) -> str | None:
    """The checkpoint's jinja chat template: chat_template.jinja (transformers 5) or tokenizer_config.json."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def read_sentencepiece(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing.")
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(path.read_bytes())
    except Exception as err:  # sentencepiece raises RuntimeError or OSError with a C++ message
        raise CheckpointError(f"{path} is not a valid SentencePiece model ({err}). It is damaged or incomplete: "
                              "download it again.") from None
    return sp


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}). Download it again.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, found {type(data).__name__}.")
    return data
