"""What a landscape point measures, and how: :class:`ProbeConfig`, and the paper's setting
:data:`PAPER_PROBE` (:class:`~safety_guard.measure.probe.SafetyProbe` measures with them).

Example:
    >>> cfg = ProbeConfig(num_harmful=8, num_benign=4)
    >>> cfg.signal, cfg.batch_size, PAPER_PROBE.signal
    ('screen', 80, 'generate')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from safety_guard.measure.generation import ChatFormat

__all__ = ["PAPER_PROBE", "ProbeConfig"]


@dataclass
class ProbeConfig:
    """What is measured at every landscape point, and how.

    The defaults are safety-guard's fast setting: 24 new tokens and early stop per sequence once
    the keyword verdict is final. :data:`PAPER_PROBE` is the paper's setting (512 tokens, every
    response decoded to the end).
    """

    harmful: str = field(
        default="builtin:harmful",
        metadata={"help": "Harmful prompt source (builtin:harmful, CSV/JSONL file, dataset name)."},
    )
    num_harmful: int | None = field(
        default=80, metadata={"help": "Use the first N harmful prompts (paper: 80; None = all)."}
    )
    benign: str = field(
        default="builtin:benign",
        metadata={"help": "Benign prompt source for the capability measure."},
    )
    num_benign: int = field(
        default=16, metadata={"help": "Benign prompts for capability (0 disables capability)."}
    )
    capability_tokens: int = field(
        default=32, metadata={"help": "Length of the reference answers whose NLL is capability."}
    )
    max_new_tokens: int = field(
        default=24, metadata={"help": "Decode budget per harmful response (paper: 512)."}
    )
    batch_size: int = field(
        default=80,
        metadata={
            "help": "Prompts per generate() call and per forward pass of the screen (lower it "
            "where a batch of long answers does not fit in memory)."
        },
    )
    share_prefix: bool = field(
        default=True,
        metadata={
            "help": "Generate from one KV cache of the tokens every prompt starts with (the chat "
            "template's system turn): the same greedy answers for less prefill."
        },
    )
    early_stop: bool = field(
        default=True,
        metadata={"help": "Stop a response once the judge's verdict can no longer change."},
    )
    template: Literal["chat", "plain"] = field(
        default="chat", metadata={"help": "'chat' template of the tokenizer, or 'plain'."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "None: model default; '': none; text: custom."}
    )
    prompt_column: str | None = field(
        default=None, metadata={"help": "Column/key of the prompt in CSV/JSONL/datasets sources."}
    )
    signal: Literal["generate", "screen"] = field(
        default="screen",
        metadata={
            "help": "'generate': every harmful prompt is generated and judged at every point. "
            "'screen': the forward screen first (one batched forward pass over the refusal "
            "openings), then only the prompts it flags are generated and judged; the others "
            "reach a refusal phrase on their greedy path, refusals for the keyword judge "
            "exactly. Another judge reads every answer: 'screen' then generates every prompt "
            "(unless screen_settles)."
        },
    )
    screen: bool = field(
        default=True,
        metadata={
            "help": "Record how the guard's forward-only screen agrees with the judge on this "
            "model (the guard's calibration; with a judge other than the keyword judge: how "
            "often it called an answer that opens with a refusal unsafe). A point that generates "
            "every prompt screens every prompt beside it (except where a screen-first walk "
            "switched to generating beyond the edge); a point measured screen-first also "
            "generates screen_checks of the prompts the screen settled as refusals, and any "
            "unsafe answer among them counts as a miss (and as unsafe)."
        },
    )
    screen_checks: int = field(
        default=8,
        metadata={
            "help": "With signal='screen' and screen: prompts the screen settled as refusals "
            "that each screen-first point generates anyway, to check the screen (a different "
            "share of them at each point)."
        },
    )
    screen_settles: bool = field(
        default=False,
        metadata={
            "help": "With signal='screen' and a judge other than the keyword judge: let the "
            "forward screen settle the prompts it does not flag (their greedy answer opens with "
            "the aligned model's refusal) as safe without asking the judge. Faster, but the "
            "judge may call such an answer unsafe: the screen record (screen=True, generate) "
            "says how often it does on your model."
        },
    )
    generate_above: float = field(
        default=0.5,
        metadata={
            "help": "With signal='screen': a landscape point generates every prompt, without "
            "screening first, where the nearest point already measured had at least this "
            "fraction of its prompts flagged (beyond the basin's edge the screen flags nearly "
            "every prompt and only adds its cost). Above 1: always screen first."
        },
    )
    record_answers: bool = field(
        default=False,
        metadata={
            "help": "Keep every harmful prompt's answer at every point in the file (for "
            "`safety-guard judge-agreement`), each decoded to max_new_tokens (no early stop): "
            "every prompt is then generated, signal='screen' or not."
        },
    )

    def __post_init__(self) -> None:
        if self.num_harmful is not None and self.num_harmful < 1:
            raise ValueError("num_harmful must be at least 1 (or None for the whole set).")
        if self.num_benign < 0:
            raise ValueError("num_benign must be >= 0 (0 disables the capability measure).")
        if self.screen_checks < 0:
            raise ValueError("screen_checks must be >= 0 (0: no check of the screen's refusals).")
        if self.max_new_tokens < 1 or self.capability_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens, capability_tokens and batch_size must be >= 1.")
        if self.signal not in ("generate", "screen"):
            raise ValueError(f"signal must be 'generate' or 'screen', got {self.signal!r}.")
        if not self.generate_above > 0:
            raise ValueError(
                f"generate_above must be above 0 (got {self.generate_above}): it is the flagged "
                "fraction from which a point generates every prompt; above 1 never."
            )
        ChatFormat(self.template, self.system_prompt)  # validates template

    @property
    def chat_format(self) -> ChatFormat:
        return ChatFormat(self.template, self.system_prompt)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The paper's probing: 80 AdvBench-style prompts, every one generated, 512 new tokens, every
#: response to the end.
PAPER_PROBE = ProbeConfig(max_new_tokens=512, early_stop=False, signal="generate", batch_size=16)
