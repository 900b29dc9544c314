"""The training stage: records -> tokenized prompt/completion rows -> TRL SFTTrainer with LoRA -> adapter folder."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .accumulation import TokenWeightedAccumulation
from .artifacts import (
    FOLDER,
    FOLDER_MANIFEST,
    WORKDIR,
    Output,
    atomic_directory,
    build_manifest,
    claim_outputs,
    is_disk_full,
    sha256_file,
    write_json_atomic,
    write_workdir_manifest,
)
from .batching import (
    AUTO,
    BATCH_FLAGS,
    BatchChoice,
    BatchShape,
    Rows,
    allocated_gpu_gib,
    choose_batch,
    free_gpu_gib,
    model_size,
    report_packing,
    report_padding,
    step_down,
)
from .cli import UserError, is_main_process, say
from .data import TokenizedRecords, split_records, tokenize_records
from .families import family
from .modeling import ADAPTER_MANIFEST, add_lora, choose_backend, cuda_available, enable_recomputation, load_base_model
from .neftune import per_example_neftune
from .records import IgnoredFields, read_records

if TYPE_CHECKING:  # progress imports transformers, which Unsloth must patch first; TRL likewise
    from trl import SFTTrainer

    from .progress import ProgressCallback, StopOnSignal, TokenCountingCollator

CHECKPOINT_PREFIX = "checkpoint-"
RESUME_OFF = ("", "false", "no", "none")  # --resume_from_checkpoint values that start from scratch
# Files without which a checkpoint cannot resume; trainer_state.json is written last, so it marks completion.
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


def require_one_batch(cfg, train_rows: int, world_size: int) -> None:
    """`auto` can go down to one row per device."""
    micro_batch = 1 if cfg.per_device_train_batch_size == AUTO else cfg.per_device_train_batch_size
    if train_rows < micro_batch * world_size:
        raise UserError(
            f"{cfg.dataset_path}: {train_rows} training rows (after the split and length limit) are fewer than one "
            f"batch ({cfg.per_device_train_batch_size} per device x {world_size} devices); add rows or lower "
            "--per_device_train_batch_size"
        )


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unusable (unreadable header, or a size its header does not account for)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < header_size <= path.stat().st_size - 8:
            return "its header is cut short"
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not valid JSON"
    try:
        data_size = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                        default=0)
    except (AttributeError, KeyError, IndexError, TypeError):
        return "its header does not list tensors"
    if 8 + header_size + data_size != path.stat().st_size:
        return "its size does not match its header (truncated)"
    return None


def torch_file_problem(path: Path) -> str | None:
    """Why a torch.save file is unusable: torch writes zip archives, whose directory and CRCs catch cuts and flips."""
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return "it is truncated or not a torch file"
    return f"its member {broken} fails its checksum" if broken else None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a missing, empty, truncated or corrupt file), or None."""
    for name in CHECKPOINT_FILES:
        if not (folder / name).is_file() or (folder / name).stat().st_size == 0:
            return f"{name} is missing or empty"
    problems = {"adapter_model.safetensors": safetensors_problem(folder / "adapter_model.safetensors")}
    for path in sorted(folder.glob("*.pt")) + sorted(folder.glob("rng_state*.pth")):
        problems[path.name] = torch_file_problem(path)
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        problems["trainer_state.json"] = None if isinstance(state.get("global_step"), int) else "it has no global_step"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        problems["trainer_state.json"] = "it is not a JSON object"
    return next((f"{name}: {problem}" for name, problem in problems.items() if problem), None)


def checkpoint_global_step(folder: str | Path) -> int:
    return json.loads((Path(folder) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]


def checkpoint_step(folder: Path) -> int:
    suffix = folder.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if suffix.isdigit() else -1


def find_resume_checkpoint(setting: str, output_dir: str, quiet: bool = False) -> str | None:
    """`false` -> None; a path -> that checkpoint (validated); `auto` -> the latest complete one, if any."""
    if setting.lower() in RESUME_OFF:
        return None
    if setting.lower() != "auto":
        folder = Path(setting)
        problem = checkpoint_problem(folder)
        if problem:
            raise UserError(f"{folder}: not a usable checkpoint ({problem}); pass another one, or auto")
        return str(folder)
    candidates = sorted(
        (path for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(path) >= 0),
        key=checkpoint_step,
        reverse=True,
    )
    for folder in candidates:
        problem = checkpoint_problem(folder)
        if not problem:
            return str(folder)
        if not quiet:
            say(f"skipping {folder}: incomplete or corrupt checkpoint ({problem})")
    if not quiet:
        say(f"no complete checkpoint in {output_dir}; starting from scratch")
    return None


def answer_only_loss(model, inputs, num_items_in_batch=None):
    """The causal-LM loss with the LM head applied to the labelled (answer) positions only.

    The same value as the model's own loss, but Qwen2.5's 151,936-wide head is not run over the prompt tokens,
    whose logits carry no loss: on a CPU that matmul dominates a small model's step.
    """
    import torch

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = inputs["labels"]
    decoder_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "position_ids") if key in inputs}
    hidden = causal_lm.model(**decoder_inputs).last_hidden_state
    targets = labels[:, 1:]
    labelled = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][labelled]).float()
    total = torch.nn.functional.cross_entropy(logits, targets[labelled], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else labelled.sum()
    return total / count


def keep_4bit_layout_trainable(model) -> None:
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first forward in eval mode, and
    never back: training after a mid-run evaluation then fails ("a view of a leaf Variable ... in-place")."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def claim_training_outputs(cfg):
    """The output rule (qwen_sft/artifacts.py) for the three folders training writes, checked before anything slow
    and locked for the run. OUTPUT_DIR is written in place and may hold the checkpoint a run resumes from."""
    outputs = [Output("--output_dir", cfg.output_dir, WORKDIR), Output("--adapter_dir", cfg.adapter_dir, FOLDER),
               Output("--tokenizer_dir", cfg.tokenizer_dir, FOLDER)]
    resume = cfg.resume_from_checkpoint
    inputs = {"--dataset_path": cfg.dataset_path,
              "--base_model": cfg.base_model if Path(cfg.base_model).expanduser().exists() else "",
              "--resume_from_checkpoint": "" if resume.lower() in ("auto", *RESUME_OFF) else resume}
    return claim_outputs(inputs, outputs, "train", cfg.overwrite_output, lock=is_main_process())


def write_output_dir_manifest(cfg) -> None:
    """This run's manifest in OUTPUT_DIR marks it as ours, so that later runs may write (and resume) there."""
    if is_main_process():
        write_workdir_manifest(cfg.output_dir, build_manifest("train", cfg, contents="checkpoints and logs"))


def sft_trainer_class():
    """TRL's SFTTrainer with token-weighted accumulation on every backend, exact 4-bit resumes, and CPU fixes, so
    that the CPU path (tests, CI) runs the same stage code."""
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    class PortableSFTTrainer(TokenWeightedAccumulation, SFTTrainer):
        def create_model_card(self, *args, **kwargs):
            pass  # TRL writes README.md into OUTPUT_DIR at each checkpoint, over any README.md of the user's there

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            num_items_in_batch = self.loss_token_count(inputs, num_items_in_batch)  # every loss token-weighted
            # TRL 1.15's fused loss is a Triton kernel (CUDA/XPU only); elsewhere use the model's own loss, with the
            # LM head on the answer tokens only where no wrapper (data parallel) needs the full forward.
            if self.args.device.type in ("cuda", "xpu"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if return_outputs or self.args.world_size > 1 or "labels" not in inputs:
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            return answer_only_loss(model, inputs, num_items_in_batch)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # TRL trains the adapter of a quantized (QLoRA) model in bf16, but PEFT's load_adapter upcasts the
            # resumed weights to fp32: without the cast back, a resumed 4-bit run drifts from an uninterrupted one.
            # This runs before the optimizer is built and its state loaded, so that state keeps its dtypes too.
            trained_dtypes = {name: p.dtype for name, p in (model or self.model).named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for name, parameter in (model or self.model).named_parameters():
                if name in trained_dtypes and parameter.dtype != trained_dtypes[name]:
                    parameter.data = parameter.data.to(trained_dtypes[name])

        def _load_optimizer_and_scheduler(self, checkpoint):
            # Under CPU data parallel, transformers maps the optimizer state to "cpu:<rank>", which torch.load
            # rejects; CPU tensors need no mapping.
            if checkpoint is None or self.args.device.type != "cpu" or self.args.world_size == 1:
                return super()._load_optimizer_and_scheduler(checkpoint)
            folder = Path(checkpoint)
            self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))

    return PortableSFTTrainer


def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(row["step"], row["loss"]) for row in log_history if "loss" in row]
    evaluation = [(row["step"], row["eval_loss"]) for row in log_history if "eval_loss" in row]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evaluation:
        axes.plot(*zip(*evaluation), marker="o", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"{family.NAME} LoRA SFT")
    axes.grid(alpha=0.3)
    if train or evaluation:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def check_step_limit(cfg) -> None:
    """-1 means "train --num_train_epochs epochs", as in transformers; there, 0 would silently train one step."""
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise UserError(
            f"--max_steps must be 1 or more optimizer steps, or -1 to train --num_train_epochs epochs; got "
            f"{cfg.max_steps}"
        )


def planned_steps(trainer) -> int:
    """The step count the trainer will stop at, computed as trainer.train() computes it."""
    if trainer.args.max_steps > 0:
        return trainer.args.max_steps
    return trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]


def is_finished(trainer, checkpoint: str, adapter_dir: str) -> tuple[bool, bool]:
    """(the checkpoint is the run's last step, the adapter of that step is already written)."""
    done, planned = checkpoint_global_step(checkpoint), planned_steps(trainer)
    if done < planned:
        return False, False
    manifest = Path(adapter_dir) / ADAPTER_MANIFEST
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if json.loads(manifest.read_text(encoding="utf-8")).get("global_step") == done:
            say(f"the run is complete: {checkpoint} is step {done} of {planned} and its adapter is in {adapter_dir}/; "
                "nothing left to train")
            return True, True
    say(f"the run is complete: {checkpoint} is step {done} of {planned}; writing its adapter without training")
    return True, False


def restore_finished_run(trainer, checkpoint: str) -> None:
    """Put the trainer where train() leaves it at the end of a run, from the run's last checkpoint."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and Path(best).is_dir():
        trainer._load_best_model()


def launched_processes() -> int:
    """How many processes train together (torchrun and accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def effective_batch_size(cfg) -> int:
    return cfg.per_device_train_batch_size * launched_processes() * cfg.gradient_accumulation_steps


@dataclass
class StageRows:
    """The rows the stage trains and evaluates on, tokenized, and how many rows the dataset file has."""

    dataset_rows: int
    train: TokenizedRecords
    eval: TokenizedRecords
    dataset_formats: dict = field(default_factory=dict)  # rows per format and per ignored field (IgnoredFields)


@dataclass
class TrainingRun:
    """The trainer and the stage's parts around it: the clean stop on a signal, the token count, the progress line."""

    trainer: SFTTrainer
    stop_on_signal: StopOnSignal
    token_counter: TokenCountingCollator
    progress: ProgressCallback


def train(cfg, script_name: str, callbacks: Sequence = (), trainer_class: Callable[[], type] = sft_trainer_class):
    """Run the stage; returns the trainer (its model holds the trained adapter).

    Benchmarks and tests watch or time a run through two hooks instead of patching the stage: `callbacks`,
    transformers TrainerCallbacks added after the stage's own, and `trainer_class`, a function returning the trainer
    class (a subclass of `sft_trainer_class()` may extend, say, its training_step). The function is called
    once the backend is loaded, because Unsloth must patch TRL before TRL is imported.
    """
    with contextlib.ExitStack() as locks:  # released however the stage ends
        backend = check_stage(cfg, locks)
        records, train_records, eval_records, formats = read_and_split(cfg)  # before the (slow) model load
        model, tokenizer = load_model(cfg, backend)
        rows = prepare_rows(cfg, tokenizer, len(records), train_records, eval_records)
        rows.dataset_formats = formats.report()
        choice = settle_batch(cfg, model, rows)
        model = add_adapter(cfg, model, backend)
        run = build_trainer(cfg, model, tokenizer, rows, callbacks, trainer_class)
        resume, finished, adapter_written = resume_point(cfg, run.trainer)
        if adapter_written:
            return run.trainer
        wall_time, choice = run_training(cfg, run, resume, finished, script_name, choice, backend)
        outcome = measure(run, wall_time, has_eval=bool(rows.eval.rows))  # collectives: every process takes part
        if run.trainer.is_world_process_zero():
            manifest = training_manifest(cfg, backend, rows, run.trainer, resume, outcome, choice)
            save_outputs(cfg, run.trainer, tokenizer, manifest)
        return run.trainer


def check_stage(cfg, locks: contextlib.ExitStack) -> str:
    """The flags that need each other, and the output folders (claimed for as long as `locks` holds), checked
    before anything slow (each flag alone is checked against settings.RULES when parsed); returns the backend."""
    check_step_limit(cfg)
    backend = choose_backend(cfg.backend)
    if cfg.packing and backend != "unsloth":
        raise UserError(
            "--packing true needs the Unsloth backend (a CUDA GPU and requirements-gpu.txt): with transformers' "
            "sdpa attention, packed examples would attend across their boundaries; use --packing false"
        )
    locks.enter_context(claim_training_outputs(cfg))
    return backend


def read_and_split(cfg) -> tuple[list[dict], list[dict], list[dict], IgnoredFields]:
    """Every row of the dataset, then its train and eval split, and the formats and ignored fields of its rows; a
    train split smaller than one batch is refused."""
    formats = IgnoredFields()
    records = read_records(cfg.dataset_path, cfg.dataset_format, formats)
    train_records, eval_records = split_records(records, cfg.eval_ratio, cfg.split_seed)
    require_one_batch(cfg, len(train_records), launched_processes())
    if cfg.load_best_model_at_end and eval_records and cfg.save_steps % cfg.eval_steps:
        raise UserError(
            f"--save_steps {cfg.save_steps} must be a multiple of --eval_steps {cfg.eval_steps} when "
            "--load_best_model_at_end is true (the best checkpoint is chosen at evaluations)"
        )
    return records, train_records, eval_records, formats


def load_model(cfg, backend: str):
    """The base model and its tokenizer. Unsloth patches transformers and TRL when imported, so the backend is
    loaded before anything imports TRL."""
    model, tokenizer = load_base_model(cfg.base_model, backend, cfg.load_in_4bit, cfg.max_seq_length)
    say(f"backend: {backend} (base model {cfg.base_model}, 4-bit {cfg.load_in_4bit})")
    if cfg.packing:
        from .packed_attention import enable_varlen_packed_attention

        say(f"packing: padding-free rows; attention: {enable_varlen_packed_attention()}")
    return model, tokenizer


def prepare_rows(cfg, tokenizer, dataset_rows: int, train_records: list[dict], eval_records: list[dict]) -> StageRows:
    """The split tokenized and fitted to MAX_SEQ_LENGTH, with a line on what fitting, padding and batching do."""
    rows = StageRows(dataset_rows,
                     tokenize_records(tokenizer, train_records, cfg.system_prompt, cfg.max_seq_length),
                     tokenize_records(tokenizer, eval_records, cfg.system_prompt, cfg.max_seq_length))
    for name, stats in (("train", rows.train.stats), ("eval", rows.eval.stats)):
        if any(stats.values()):
            say(
                f"{name}: {stats['prompt_truncated']} prompts cut from the left to fit --max_seq_length "
                f"{cfg.max_seq_length}; {stats['dropped_answer_too_long']} rows dropped (answer alone too long); "
                f"{stats['conversations_shortened']} conversations lost their {stats['exchanges_dropped']} oldest "
                f"exchanges; {stats['dropped_last_exchange_too_long']} conversations dropped (last exchange alone "
                f"too long); {stats['text_truncated']} text rows cut to their first {cfg.max_seq_length} tokens"
            )
    return rows


def settle_batch(cfg, model, rows: StageRows) -> BatchChoice:
    """The batch settings left `auto`, chosen for the GPU found (batching.choose_batch) and written into `cfg`;
    then the lines on the choice, the padding and the effective batch."""
    lengths = [len(row["input_ids"]) for row in rows.train.rows]
    # Packed rows are filled up to --max_seq_length (about 3.4 examples each on the data stage's mix).
    seen = (Rows(cfg.max_seq_length, cfg.max_seq_length, True) if cfg.packing
            else Rows(max(lengths, default=1), sum(lengths) / max(len(lengths), 1), False))
    size = model_size(model.config, cfg.lora_r, cfg.lora_target_modules)
    settings = {name: cfg[name] for name in BATCH_FLAGS}
    choice = choose_batch(settings, launched_processes(), len(lengths), seen, size, least_free_gpu_gib())
    choice = replace(choice, loaded_gib=allocated_gpu_gib())
    use_shape(cfg, choice.shape)
    say(choice.line())
    if not cfg.packing:
        report_padding(cfg, lengths)
    say(
        f"effective batch size: {cfg.per_device_train_batch_size} per device x {cfg.gradient_accumulation_steps} "
        f"accumulation x {launched_processes()} processes = {effective_batch_size(cfg)} rows per step"
    )
    require_one_batch(cfg, len(lengths), launched_processes())
    return choice


def least_free_gpu_gib() -> float | None:
    """The free GPU memory of the process with the least: every process must train with the same shape."""
    free = free_gpu_gib()
    if free is None or launched_processes() == 1:
        return free
    import torch
    from accelerate import PartialState  # sets up the process group, as the trainer's arguments would next

    value = torch.tensor([free], device=PartialState().device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return float(value)


def use_shape(cfg, shape: BatchShape) -> None:
    cfg.update(PER_DEVICE_TRAIN_BATCH_SIZE=shape.micro_batch, GRADIENT_ACCUMULATION_STEPS=shape.accumulation,
               GRADIENT_CHECKPOINTING=shape.recompute)


def add_adapter(cfg, model, backend: str):
    """The base model wrapped with trainable LoRA adapters, initialised from --seed."""
    from transformers import set_seed

    set_seed(cfg.seed)  # the LoRA initialisation draws from the global RNG
    model = add_lora(
        model, backend, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, cfg.seed,
        cfg.gradient_checkpointing,
    )
    keep_4bit_layout_trainable(model)
    return model


def sft_config(cfg, has_eval: bool):
    """TRL's SFTConfig from the stage's flags: prompt/completion rows with the loss on the completion only, mixed
    precision on a GPU, evaluations and checkpoints every N steps, TensorBoard logs."""
    import torch
    from trl import SFTConfig

    load_best = cfg.load_best_model_at_end and has_eval
    on_gpu = cuda_available()
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    return SFTConfig(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=load_best,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        neftune_noise_alpha=None,  # ours, sized per example also when packed (qwen_sft/neftune.py)
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        fp16=on_gpu and not bf16,
        max_length=cfg.max_seq_length,
        completion_only_loss=True,
        packing=cfg.packing,
        padding_free=cfg.packing,
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not cfg.packing else "random",
        report_to=["tensorboard"],
        disable_tqdm=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every step
        use_cpu=not on_gpu,
    )


def build_trainer(cfg, model, tokenizer, rows: StageRows, callbacks: Sequence, trainer_class) -> TrainingRun:
    """The trainer over the tokenized rows, its collator counting real tokens, with the stage's callbacks (the
    stop on a signal, the progress line) and then the caller's."""
    from datasets import Dataset

    from .progress import ProgressCallback, StopOnSignal, TokenCountingCollator

    has_eval = bool(rows.eval.rows)
    args = sft_config(cfg, has_eval)
    stop_on_signal = StopOnSignal()
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows.train.rows),
        eval_dataset=Dataset.from_list(rows.eval.rows) if has_eval else None,
        processing_class=tokenizer,
        callbacks=[stop_on_signal],
    )
    if cfg.packing:
        report_packing(cfg, len(rows.train.rows), len(trainer.train_dataset), launched_processes())
    token_counter = TokenCountingCollator(trainer.data_collator)
    trainer.data_collator = token_counter
    progress = ProgressCallback(token_counter)
    for callback in (progress, *callbacks):
        trainer.add_callback(callback)
    return TrainingRun(trainer, stop_on_signal, token_counter, progress)


def resume_point(cfg, trainer) -> tuple[str | None, bool, bool]:
    """(the checkpoint to resume from or None, it is the run's last step, that step's adapter is already written).
    Also marks OUTPUT_DIR as ours."""
    resume = find_resume_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
    write_output_dir_manifest(cfg)
    if resume:
        say(f"resuming from {resume}")
    finished, adapter_written = is_finished(trainer, resume, cfg.adapter_dir) if resume else (False, False)
    return resume, finished, adapter_written


def run_training(cfg, run: TrainingRun, resume: str | None, finished: bool, script_name: str, choice: BatchChoice,
                 backend: str) -> tuple[float, BatchChoice]:
    """Train (or restore a finished run) with the signal handler and NEFTune installed; returns the wall time and
    the batch shape trained with. A signal, a second signal and CUDA out of memory (past `auto`'s one step down)
    each end the stage with one line on how to go on."""
    import torch

    trainer, stop_on_signal = run.trainer, run.stop_on_signal
    started = time.time()
    try:
        with stop_on_signal.installed(), per_example_neftune(trainer.model, cfg.neftune_noise_alpha):
            if finished:
                restore_finished_run(trainer, resume)
            else:
                choice = train_stepping_down(cfg, run, resume, choice, backend)
    except KeyboardInterrupt:
        if not stop_on_signal.received:  # Ctrl-C outside the handler's reach keeps its traceback
            raise
        saved = find_resume_checkpoint("auto", cfg.output_dir, quiet=True)
        say(
            f"stopped at once by a second {stop_on_signal.received} at step {trainer.state.global_step}, without "
            f"saving; " + (f"resume from {saved} with --resume_from_checkpoint auto" if saved else "no checkpoint yet")
        )
        raise SystemExit(130) from None
    except torch.cuda.OutOfMemoryError:
        raise UserError(out_of_memory_message(cfg, trainer.state.global_step)) from None
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise UserError(disk_full_message(cfg, trainer.state.global_step)) from None
    wall_time = time.time() - started

    if stop_on_signal.received:
        saved = find_resume_checkpoint("auto", cfg.output_dir, quiet=True)
        where = f"checkpoint {saved} is saved" if saved else "no checkpoint was saved yet"
        say(
            f"stopped by {stop_on_signal.received} at step {trainer.state.global_step}; {where}. "
            f"Resume with: python {os.path.basename(script_name)} --resume_from_checkpoint auto (and the same flags)"
        )
        raise SystemExit(130)
    return wall_time, choice


def train_stepping_down(cfg, run: TrainingRun, resume: str | None, choice: BatchChoice, backend: str) -> BatchChoice:
    """trainer.train(); where `auto` chose the batch shape and the first step runs out of memory (the first
    batch holds the longest row), once more one step down (batching.step_down). Returns the shape trained with.
    A single process only: the other processes of a data-parallel run would wait for the failed one."""
    import torch

    try:
        run.trainer.train(resume_from_checkpoint=resume)
        return choice
    except torch.cuda.OutOfMemoryError:
        first_step = run.progress.first_step_s is None
        smaller = step_down(choice) if first_step and launched_processes() == 1 else None
        if smaller is None:
            raise
    # Outside the except block, so that the failed step's tensors, held by the traceback, are freed.
    say(f"CUDA out of memory in the first step with {choice.shape}: stepping down to {smaller.shape}")
    restart_with_shape(cfg, run, smaller.shape, backend)
    run.trainer.train(resume_from_checkpoint=resume)
    return smaller


def restart_with_shape(cfg, run: TrainingRun, shape: BatchShape, backend: str) -> None:
    """Set the trainer up to start again with `shape`: its batch settings, recomputation, a fresh optimizer and
    schedule (the failed first step updated no weight), the token counts from zero, the GPU memory released."""
    import gc

    import torch

    trainer = run.trainer
    if shape.recompute and not cfg.gradient_checkpointing:
        enable_recomputation(trainer.model, backend)
    use_shape(cfg, shape)
    trainer.args.per_device_train_batch_size = trainer.args.per_device_eval_batch_size = shape.micro_batch
    trainer.args.gradient_accumulation_steps = shape.accumulation
    trainer._train_batch_size = trainer.args.train_batch_size
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.model.zero_grad(set_to_none=True)
    counter = run.token_counter
    counter.real_tokens = counter.token_slots = counter.batches = 0
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def disk_full_message(cfg, step: int) -> str:
    """The one line for a disk that filled up while a checkpoint was written; that half checkpoint is removed (this
    run was writing it), so `--resume_from_checkpoint auto` takes the last complete one."""
    half = Path(cfg.output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    if half.is_dir() and checkpoint_problem(half):
        shutil.rmtree(half, ignore_errors=True)
    saved = find_resume_checkpoint("auto", cfg.output_dir, quiet=True)
    return (f"{cfg.output_dir}: cannot write the checkpoint of step {step} (the disk is full); "
            + (f"{saved} is the last complete one" if saved else "no checkpoint is saved yet")
            + "; free some space, then resume with --resume_from_checkpoint auto")


def out_of_memory_message(cfg, step: int) -> str:
    return (
        f"CUDA out of memory at step {step}: "
        + ("set --gradient_checkpointing true (or use --preset gpu24), or " if not cfg.gradient_checkpointing else "")
        + "lower --per_device_train_batch_size "
        f"(now {cfg.per_device_train_batch_size}) and raise --gradient_accumulation_steps (now "
        f"{cfg.gradient_accumulation_steps}) to keep the effective batch, or lower --max_seq_length (now "
        f"{cfg.max_seq_length}); resume with --resume_from_checkpoint auto"
    )


def measure(run: TrainingRun, wall_time: float, has_eval: bool) -> dict:
    """The final evaluation, the token counts and the throughput: collectives, so every process calls this."""
    accelerator = run.trainer.accelerator
    return {"final_eval": run.trainer.evaluate() if has_eval else {}, "wall_time_s": round(wall_time, 2),
            "tokens": run.token_counter.summary(accelerator), "throughput": run.progress.summary(accelerator)}


def training_manifest(cfg, backend: str, rows: StageRows, trainer, resume: str | None, outcome: dict,
                      choice: BatchChoice) -> dict:
    """The adapter's manifest: the config, the data, and what the run did (see `measure`)."""
    final_eval = outcome["final_eval"]
    return build_manifest(
        "train",
        {key: value for key, value in cfg.items()},
        base_model=cfg.base_model,
        backend=backend,
        load_in_4bit=cfg.load_in_4bit,
        dataset={"path": str(cfg.dataset_path), "sha256": sha256_file(cfg.dataset_path), "rows": rows.dataset_rows,
                 **rows.dataset_formats},
        rows={"train": len(rows.train.rows), "eval": len(rows.eval.rows), "train_stats": rows.train.stats,
              "eval_stats": rows.eval.stats},
        world_size=launched_processes(),
        effective_batch_size=effective_batch_size(cfg),
        batch_choice=choice.record(),
        resumed_from=resume,
        global_step=trainer.state.global_step,
        best_checkpoint=trainer.state.best_model_checkpoint,
        final_eval_loss=final_eval.get("eval_loss"),
        final_eval_perplexity=math.exp(final_eval["eval_loss"]) if "eval_loss" in final_eval else None,
        wall_time_s=outcome["wall_time_s"],
        tokens=outcome["tokens"],
        loss_weighting={"token_weighted": trainer.model_accepts_loss_kwargs,
                        "steps_counted_by_qwen_sft": trainer.steps_counted_here},
        throughput=outcome["throughput"],
        log_history=trainer.state.log_history,
    )


def save_outputs(cfg, trainer, tokenizer, manifest: dict) -> None:
    """The adapter folder (adapter, tokenizer, loss curve, manifest) and the tokenizer folder, each renamed into
    place only when complete."""
    with atomic_directory(cfg.adapter_dir) as folder:
        trainer.model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        plot_loss_curve(trainer.state.log_history, folder / "loss_curve.png")
        write_json_atomic(folder / ADAPTER_MANIFEST, manifest)
    with atomic_directory(cfg.tokenizer_dir) as folder:
        tokenizer.save_pretrained(folder)
        write_json_atomic(folder / FOLDER_MANIFEST, build_manifest("train", cfg, contents="tokenizer"))
    say(f"adapter, tokenizer, loss curve and manifest written to {cfg.adapter_dir}/ (tokenizer also in "
        f"{cfg.tokenizer_dir}/)")
    if manifest["final_eval_loss"] is not None:
        say(f"final eval_loss {manifest['final_eval_loss']:.4f}, perplexity {manifest['final_eval_perplexity']:.3f}")
