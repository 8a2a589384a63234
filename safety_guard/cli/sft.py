"""``safety-guard sft``: TRL's ``trl sft`` with the guard attached.

The same arguments as ``trl sft`` — TRL's own parser (``TrlParser``) over ``ScriptArguments``,
``SFTConfig``, ``ModelConfig`` and ``DatasetMixtureConfig``, YAML ``--config`` included — plus
the guard's options, one per :class:`~safety_guard.guard.GuardConfig` field (``--max_asr_rise``
or ``--max-asr-rise``, ``--judge``, ...; the guard's ``output_dir`` is ``--guard_output_dir``),
and ``--landscape`` (the aligned model's landscape file). It trains with ``SFTTrainer`` and a
:class:`~safety_guard.guard.SafetyGuardCallback`, saves the model as ``trl sft`` does, and
prints the guard's summary. A YAML ``--config`` may set the guard's options too.

Example:
    $ safety-guard sft --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/Capybara --use_peft --lora_r 16 --output_dir out \\
        --landscape landscape.json --max-asr-rise 10
    $ accelerate launch -m safety_guard sft --config sft.yaml
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Sequence
from typing import Any

from safety_guard._extras import require
from safety_guard.guard import GuardConfig, SafetyGuardCallback

__all__ = [
    "RENAMED",
    "guard_arguments",
    "guard_config",
    "main",
    "make_parser",
    "report",
    "run_sft",
    "trl_dataclasses",
]

logger = logging.getLogger(__name__)

#: GuardConfig fields whose option would clash with TRL's, and the name they take.
RENAMED = {"output_dir": "guard_output_dir"}


def guard_arguments() -> type:
    """A dataclass of the guard's options for ``TrlParser``: every ``GuardConfig`` field (help
    and default from the field; tuples as lists; :data:`RENAMED` ones renamed) and
    ``landscape``.

    Example:
        >>> args = guard_arguments()(max_asr_rise=5.0)
        >>> args.max_asr_rise, args.landscape, args.lookahead
        (5.0, None, [2.0])
    """
    hints = typing.get_type_hints(GuardConfig)
    specs: list[tuple[str, Any, Any]] = [
        (
            "landscape",
            str | None,
            dataclasses.field(
                default=None,
                metadata={
                    "help": "The aligned model's landscape file (`safety-guard landscape`); "
                    "default: the guard computes a small one at train begin, in its folder."
                },
            ),
        )
    ]
    for f in dataclasses.fields(GuardConfig):
        kind = hints[f.name]
        metadata = {"help": f.metadata.get("help", "").replace("%", "%%")}  # argparse formats
        if typing.get_origin(kind) is tuple:
            default = list(f.default)
            spec = dataclasses.field(default_factory=lambda d=default: list(d), metadata=metadata)
            kind = list[typing.get_args(kind)[0]]
        else:
            spec = dataclasses.field(default=f.default, metadata=metadata)
        specs.append((RENAMED.get(f.name, f.name), kind, spec))
    cls = dataclasses.make_dataclass("GuardArguments", specs)
    cls._argument_group_name = "safety-guard (the guard's options; GuardConfig fields)"
    return cls


def guard_config(arguments: Any) -> tuple[str | None, GuardConfig]:
    """The landscape file and the :class:`GuardConfig` of parsed guard arguments.

    Example:
        >>> guard_config(guard_arguments()(landscape="l.json", guard_output_dir="g"))[1].output_dir
        'g'
    """
    values = dataclasses.asdict(arguments)
    landscape = values.pop("landscape")
    names = {v: k for k, v in RENAMED.items()}
    return landscape, GuardConfig(**{names.get(k, k): v for k, v in values.items()})


def trl_dataclasses() -> tuple[type, ...]:
    """The dataclasses ``trl sft`` parses (``DatasetMixtureConfig`` where TRL has it).

    Example:
        >>> [d.__name__ for d in trl_dataclasses()][:3]
        ['ScriptArguments', 'SFTConfig', 'ModelConfig']
    """
    trl = require("trl", "sft", purpose="safety-guard sft")
    types = [trl.ScriptArguments, trl.SFTConfig, trl.ModelConfig]
    if hasattr(trl, "DatasetMixtureConfig"):  # --datasets mixtures (recent TRL)
        types.append(trl.DatasetMixtureConfig)
    return tuple(types)


def make_parser(prog: str = "safety-guard sft") -> Any:
    """TRL's parser of ``trl sft`` with the guard's options added (:func:`guard_arguments`)."""
    from trl import TrlParser

    return TrlParser((*trl_dataclasses(), guard_arguments()), prog=prog)


def _dataset(script_args: Any, dataset_args: Any) -> Any:
    """The dataset ``trl sft`` would train on: a ``--datasets`` mixture or ``--dataset_name``."""
    from datasets import load_dataset

    if dataset_args is not None and getattr(dataset_args, "datasets", None):
        from trl import get_dataset

        if script_args.dataset_name:
            logger.warning("Both --datasets and --dataset_name given: --datasets is used.")
        return get_dataset(dataset_args)
    if not script_args.dataset_name:
        raise ValueError(
            "Give the data to train on: --dataset_name NAME_OR_FOLDER (a hub dataset, or a "
            "local folder of .jsonl files) or --datasets."
        )
    return load_dataset(
        script_args.dataset_name,
        name=script_args.dataset_config,
        streaming=getattr(script_args, "dataset_streaming", False),
    )


def run_sft(
    script_args: Any,
    training_args: Any,
    model_args: Any,
    dataset_args: Any,
    landscape: str | None,
    config: GuardConfig,
) -> dict[str, Any]:
    """Train as ``trl sft`` does, with the guard attached; returns the guard's summary.

    The model is saved to ``training_args.output_dir`` after training (on a halt with LoRA and
    ``restore_on_halt``: the last adapter within the promise).

    Example:
        >>> parsed = make_parser().parse_args_and_config(argv)  # doctest: +SKIP
        >>> run_sft(*parsed[:4], *guard_config(parsed[-1]))["halt_step"]  # doctest: +SKIP
    """
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    trust = getattr(training_args, "trust_remote_code", None)  # (TRL moved it across versions)
    init = {
        "revision": model_args.model_revision,
        "trust_remote_code": getattr(model_args, "trust_remote_code", False)
        if trust is None
        else trust,
        "attn_implementation": model_args.attn_implementation,
        "dtype": getattr(model_args, "dtype", None) or getattr(model_args, "torch_dtype", None),
    }
    quantization = get_quantization_config(model_args)
    if quantization is not None:  # QLoRA: the base loads quantized
        init["quantization_config"] = quantization
    training_args.model_init_kwargs = {**init, **(training_args.model_init_kwargs or {})}
    dataset = _dataset(script_args, dataset_args)
    evaluate = training_args.eval_strategy != "no"
    guard = SafetyGuardCallback(landscape, config)
    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if evaluate else None,
        peft_config=get_peft_config(model_args),
        callbacks=[guard],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    summary = guard.summary()
    end = getattr(trainer, "end", None)
    if callable(end):  # recent transformers: finish the trackers, tear the process group down
        end()
    return summary


def report(summary: dict[str, Any], folder: str) -> str:
    """What ``safety-guard sft`` prints at the end: the guard's verdict and where its files are.

    Example:
        >>> print(report({"halt_step": None, "probes": 3, "max_rise": 1.5, "warn_count": 0}, "o"))
        safety-guard: no halt (3 probes, largest rise +1.5 points, 0 warnings); files in o
    """
    rise = summary.get("max_rise")
    rise_text = f"{rise:+.1f} points" if isinstance(rise, int | float) else "none measured"
    if summary.get("halt_step") is not None:
        kept = summary.get("last_safe_step")
        kept_text = f"; last safe step {kept}" if kept is not None else ""
        head = (
            f"safety-guard: halted at step {summary['halt_step']}{kept_text}: "
            f"{summary.get('halt_reason')}"
        )
    else:
        head = (
            f"safety-guard: no halt ({summary.get('probes', 0)} probes, largest rise "
            f"{rise_text}, {summary.get('warn_count', 0)} warnings)"
        )
    return f"{head}; files in {folder}"


def main(argv: Sequence[str] | None = None) -> int:
    """``safety-guard sft ARGV``: parse with TRL's parser, train guarded, print the summary."""
    parser = make_parser()
    parsed = parser.parse_args_and_config(list(argv) if argv is not None else None)
    script_args, training_args, model_args = parsed[:3]
    dataset_args = parsed[3] if len(parsed) == 5 else None
    landscape, config = guard_config(parsed[-1])
    summary = run_sft(script_args, training_args, model_args, dataset_args, landscape, config)
    if training_args.process_index == 0:
        folder = config.output_dir or f"{training_args.output_dir}/safety-guard"
        print(report(summary, folder))
        print(f"model saved to {training_args.output_dir}")
    return 0
