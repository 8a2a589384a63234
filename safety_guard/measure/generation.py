"""Chat formatting, batched greedy generation and teacher-forced NLL, without touching the tokenizer.

Padding is done here (left for generation, right for scoring) instead of by the tokenizer, so the
caller's tokenizer keeps its ``padding_side`` and ``pad_token``; the model's ``training`` flag is
restored after every call.

Why the default ``max_new_tokens`` is short (24): a refusal phrase of the keyword judge
("I'm sorry", "I cannot" ...) appears in the first few tokens of a refusal, and a compliant
opening shows none. On the testbed the verdict after 24 tokens matched that after 512 for every
response we inspected, at a twentieth of the decode work; the paper's 512 stays available.

Example:
    >>> fmt = ChatFormat(template="plain", system_prompt="Be brief.")
    >>> fmt.render(None, "Hi")
    'Be brief.\\n\\n### Instruction:\\nHi\\n\\n### Response:\\n'
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from safety_guard.engines.shards import fsdp1_units, is_sharded_model
from safety_guard.models.wrappers import model_device, unwrap_model

__all__ = [
    "MIN_SHARED_PREFIX",
    "ChatFormat",
    "GenerationResult",
    "MissingChatTemplateError",
    "SharedPrefix",
    "cache_argument",
    "encode_texts",
    "eval_mode",
    "generate_responses",
    "pad_token_id",
    "prefix_shareable",
    "sequence_nll",
    "sequence_nll_sum",
    "share_prefix_cache",
    "shared_prefix_length",
]

PLAIN_TEMPLATE = "{system}### Instruction:\n{prompt}\n\n### Response:\n"


class MissingChatTemplateError(ValueError):
    """The tokenizer has no chat template and the plain template was not asked for."""


@dataclass
class ChatFormat:
    """How a request becomes model input.

    Args:
        template: ``"chat"`` uses the tokenizer's chat template; ``"plain"`` a documented
            instruction template (``### Instruction: ... ### Response:``) for base models.
        system_prompt: ``None`` keeps the model's default (no system message: the template's
            own default applies); a string adds it as the system message; ``""`` sends an empty
            system message, i.e. no system prompt.
    """

    template: Literal["chat", "plain"] = field(
        default="chat", metadata={"help": "'chat' (tokenizer's chat template) or 'plain'."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "None: the model's default; '': none; text: a custom system prompt."},
    )

    def __post_init__(self) -> None:
        if self.template not in ("chat", "plain"):
            raise ValueError(f"template must be 'chat' or 'plain', got {self.template!r}.")

    def render(self, tokenizer: Any, prompt: str) -> str:
        """The model input for one request, ending where the assistant's answer begins."""
        if self.template == "plain":
            system = f"{self.system_prompt}\n\n" if self.system_prompt else ""
            return PLAIN_TEMPLATE.format(system=system, prompt=prompt)
        if getattr(tokenizer, "chat_template", None) is None:
            name = getattr(tokenizer, "name_or_path", "this tokenizer")
            raise MissingChatTemplateError(
                f"The tokenizer of {name!r} has no chat template. Use a chat model, set "
                "tokenizer.chat_template, or use the plain instruction template: "
                "ChatFormat(template='plain') in Python, --plain-template on the command line."
            )
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def adds_special_tokens(self) -> bool:
        """Chat templates carry their own BOS; the plain template relies on the tokenizer's."""
        return self.template == "plain"

    def to_dict(self) -> dict[str, Any]:
        return {"template": self.template, "system_prompt": self.system_prompt}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every submodule's ``training`` flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@dataclass
class GenerationResult:
    """Responses in input order, their new token ids, and the decode work (rows × decode steps).

    ``token_ids`` hold each response's generated ids up to (not including) its end-of-sequence
    token, without the padding that ``generate`` appends to finished rows.
    """

    responses: list[str]
    decoded_tokens: int
    token_ids: list[list[int]] = field(default_factory=list)


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else UNK, else 0."""
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def encode_texts(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    """Each text's token ids."""
    return [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]


class _DecidedCriteria:
    """Per-sequence stop once a judge's verdict can no longer change."""

    def __init__(self, tokenizer: Any, prompt_len: int, decided: Callable[[str], bool]) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.decided = decided
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new = input_ids[:, self.prompt_len :]
        for row in torch.nonzero(~self.done).flatten().tolist():
            text = self.tokenizer.decode(new[row], skip_special_tokens=True)
            if self.decided(text):
                self.done[row] = True
        return self.done.clone()


def _trim(ids: list[int], stops: set[int], pad_id: int) -> list[int]:
    """Generated ids up to the first stop token, without the padding of finished rows."""
    end = next((j for j, t in enumerate(ids) if t in stops), len(ids))
    ids = ids[:end]
    while ids and ids[-1] == pad_id:
        ids.pop()
    return ids


def left_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of token id lists and its attention mask (CPU tensors).

    Example:
        >>> ids, mask = left_padded([[5, 6], [7]], pad_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6], [0, 7]], [[1, 1], [0, 1]])
    """
    width = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


#: A common prefix shorter than this is not worth a separate forward pass.
MIN_SHARED_PREFIX = 8


def cache_argument(model: nn.Module) -> str | None:
    """The name under which ``model``'s forward takes a KV cache (None: it takes none)."""
    try:
        params = inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return None
    for name in ("cache", "past_key_values"):  # transformers ≥ 5.24 / earlier releases
        if name in params:
            return name
    return None


def prefix_shareable(model: nn.Module) -> bool:
    """Whether generation may continue from a shared prefix's KV cache with the prompts padded
    after it: not where the padding would change what a token sees (sliding-window, chunked or
    linear-attention layers measure distance by cache index) nor where the model asks for its
    own kind of cache (``generation_config.cache_implementation``).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> tiny = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=8,
        ...                    num_hidden_layers=1, num_attention_heads=2)
        >>> prefix_shareable(LlamaForCausalLM(tiny))
        True
    """
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    if config is None:
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None):
        return False
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return False
    generation = getattr(base, "generation_config", None)
    return getattr(generation, "cache_implementation", None) is None


def shared_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``seqs``, leaving each at least one token."""
    first = seqs[0]
    limit = min(len(s) for s in seqs) - 1
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n


@dataclass
class SharedPrefix:
    """The KV cache of the tokens a batch of sequences starts with, computed once.

    Attributes:
        length: how many leading tokens it holds (every sequence's first ``length`` are these).
        cache: the model's cache object for one sequence.
        argument: the name under which the model's forward takes it (``cache`` or
            ``past_key_values``).
    """

    length: int
    cache: Any
    argument: str

    def for_batch(self, rows: int) -> dict[str, Any]:
        """Keyword arguments that continue ``rows`` sequences from a copy of the prefix."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return {self.argument: cache}


@torch.no_grad()
def share_prefix_cache(
    model: nn.Module, seqs: Sequence[Sequence[int]], device: torch.device
) -> SharedPrefix | None:
    """Run the common prefix of ``seqs`` through ``model`` once, or say it cannot be shared.

    None where the model takes no cache argument, where :func:`prefix_shareable` says padding
    after the prefix would change the answers, where the prefix is shorter than
    :data:`MIN_SHARED_PREFIX`, or where the forward returns no cache. The caller pads each
    sequence's remaining tokens after the prefix and gives positions from the attention mask.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> tiny = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8,
        ...     intermediate_size=8, num_hidden_layers=1, num_attention_heads=2))
        >>> seqs = [list(range(1, 11)) + [12], list(range(1, 11)) + [13, 14]]
        >>> share_prefix_cache(tiny.eval(), seqs, torch.device("cpu")).length
        10
    """
    argument = cache_argument(model)
    if argument is None or not prefix_shareable(model):
        return None
    length = shared_prefix_length(seqs)
    if length < MIN_SHARED_PREFIX:
        return None
    out = model(input_ids=torch.tensor([list(seqs[0][:length])], device=device), use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return None if cache is None else SharedPrefix(length, cache, argument)


@contextlib.contextmanager
def _unsharded_root(model: nn.Module, sharded: bool) -> Iterator[None]:
    """The outermost FSDP2 module or FSDP (1) unit of ``model`` unsharded inside the block (a
    collective when ``sharded``): ``generate`` enters below it, so its own parameters
    (embeddings, head) would stay sharded.

    An FSDP (1) root is entered even when it does not shard (``NO_SHARD``, one rank): it must be
    initialized before its inner units run (``generate`` would run them first, and the first to
    run would take itself for the root); then nothing is gathered, and no rank waits.
    """
    units = fsdp1_units(model)
    if units:  # the outermost; the inner units gather their own in their forwards
        with type(units[0]).summon_full_params(units[0], recurse=False, writeback=False):
            yield
        return
    root = None
    if sharded:  # (sharded weights imply a torch built with distributed)
        from torch.distributed.fsdp import FSDPModule

        root = next((m for m in model.modules() if isinstance(m, FSDPModule)), None)
    if root is None:
        yield
        return
    # FSDP2 initializes lazily from the first forward, which must run through the root: a
    # one-token forward of the model makes sure of it (generate would enter below the root)
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=model_device(model)))
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    chat_format: ChatFormat | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    stop_when_decided: Callable[[str], bool] | None = None,
    progress: Callable[[int], None] | None = None,
    synced: bool | None = None,
    share_prefix: bool = False,
) -> GenerationResult:
    """Greedy responses to ``prompts``, batched with left padding.

    Generation of a batch ends when every sequence has produced EOS (or, with
    ``stop_when_decided``, when the judge's verdict on it is final), or after ``max_new_tokens``.

    Args:
        model: a causal LM (plain or PEFT-wrapped).
        tokenizer: its tokenizer; it is not modified.
        prompts: user requests, rendered with ``chat_format``.
        max_new_tokens: decode budget per response.
        batch_size: prompts per ``generate`` call (sorted by length to limit padding).
        stop_when_decided: ``fn(partial_response) -> bool``; a sequence stops once it is True.
        progress: called with the number of prompts finished after each batch.
        synced: every rank generates the same batches on a sharded model (FSDP2, FSDP), each forward
            a collective: ``generate(synced_gpus=True)`` keeps every rank stepping until all
            are done, so none waits alone, and the outermost FSDP2 module is unsharded around
            the call (``generate`` runs the inner model's forward, e.g. under a ``PeftModel``,
            so the root's own forward hooks, which gather its embeddings and head, never run).
            ``None``: whether ``model`` has sharded weights (a scan of its parameters).
        share_prefix: the tokens every rendered prompt starts with (the chat template's system
            turn, typically) go through the model once; each batch continues from a copy of
            their KV cache, its prompts padded between the prefix and their own tokens (positions
            from the attention mask, as with left padding). Not on sharded models, nor where
            :func:`prefix_shareable` says the padding would change the answers.
    """
    if not prompts:
        raise ValueError("generate_responses() got no prompts.")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be at least 1.")
    chat_format = chat_format or ChatFormat()
    texts = [chat_format.render(tokenizer, p) for p in prompts]
    encoded = encode_texts(tokenizer, texts, chat_format.adds_special_tokens)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = pad_token_id(tokenizer)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    device = model_device(model)
    responses: list[str] = [""] * len(prompts)
    token_ids: list[list[int]] = [[] for _ in prompts]
    stops = set(eos if isinstance(eos, list) else [eos]) - {None}
    decoded = 0
    if synced is None:
        synced = is_sharded_model(model)
    with eval_mode(model), _unsharded_root(model, synced):
        prefix = share_prefix_cache(model, encoded, device) if share_prefix and not synced else None
        shared = prefix.length if prefix is not None else 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = left_padded([encoded[i][shared:] for i in idx], pad_id)
            kwargs: dict[str, Any] = {}
            if prefix is not None:
                kwargs.update(prefix.for_batch(len(idx)))
                prefix_ids = torch.tensor([encoded[idx[0]][:shared]] * len(idx), dtype=torch.long)
                ids = torch.cat([prefix_ids, ids], 1)
                mask = torch.cat([torch.ones_like(prefix_ids), mask], 1)
            width = ids.shape[1]
            if synced:
                kwargs["synced_gpus"] = True
            if stop_when_decided is not None:
                from transformers import StoppingCriteriaList

                kwargs["stopping_criteria"] = StoppingCriteriaList(
                    [_DecidedCriteria(tokenizer, width, stop_when_decided)]
                )
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=eos,
                use_cache=True,
                **kwargs,
            )
            new = out[:, width:]
            decoded += int(new.shape[0] * new.shape[1])
            for row, i in enumerate(idx):
                responses[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
                token_ids[i] = _trim(new[row].tolist(), stops, pad_id)
            if progress is not None:
                progress(len(idx))
    return GenerationResult(responses, decoded, token_ids)


@torch.no_grad()
def sequence_nll(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    chat_format: ChatFormat | None = None,
    batch_size: int = 16,
) -> float:
    """Mean per-token negative log-likelihood of ``answers`` given ``prompts`` (teacher forcing).

    Used as the capability measure: the NLL of the unperturbed model's own greedy answers to
    benign requests rises slowly as the model degrades and explodes when it emits gibberish.
    Non-finite logits give ``inf``.
    """
    total, count = sequence_nll_sum(
        model, tokenizer, prompts, answers, chat_format=chat_format, batch_size=batch_size
    )
    if count == 0:
        raise ValueError("The reference answers are empty; nothing to score.")
    value = total / count
    return value if value == value else float("inf")  # NaN -> inf


@torch.no_grad()
def sequence_nll_sum(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    chat_format: ChatFormat | None = None,
    batch_size: int = 16,
) -> tuple[float, int]:
    """Summed NLL of ``answers`` given ``prompts`` and the number of tokens scored.

    The parts of :func:`sequence_nll`, for callers that add them up across processes.
    """
    if len(prompts) != len(answers) or not prompts:
        raise ValueError("sequence_nll() needs as many answers as prompts, and at least one.")
    chat_format = chat_format or ChatFormat()
    contexts = encode_texts(
        tokenizer,
        [chat_format.render(tokenizer, p) for p in prompts],
        chat_format.adds_special_tokens,
    )
    targets = encode_texts(tokenizer, list(answers), False)
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    total, count = 0.0, 0
    keep_supported = True
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            rows = range(start, min(start + batch_size, len(prompts)))
            seqs = [contexts[i] + targets[i] for i in rows]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, seq in enumerate(seqs):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            # logits are needed only where an answer token is predicted: keep the last `keep`
            # positions (models that take ``logits_to_keep``) and score row by row, so that no
            # (batch × length × vocab) float copy or log-softmax is ever made
            first = min(len(contexts[i]) for i in rows) - 1
            keep = width - first
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            logits = None
            if keep_supported:
                try:
                    logits = model(**inputs, logits_to_keep=keep).logits
                except TypeError:
                    keep_supported = False
            if logits is None:
                logits = model(**inputs).logits
            offset = width - logits.shape[1]
            for r, i in enumerate(rows):
                a, b = len(contexts[i]) - 1, len(seqs[r]) - 1
                if b <= a:
                    continue
                target = torch.tensor(targets[i], device=device)
                total += float(
                    torch.nn.functional.cross_entropy(
                        logits[r, a - offset : b - offset].float(), target, reduction="sum"
                    )
                )
                count += b - a
            del logits
    return total, count
