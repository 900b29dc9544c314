"""The inference stage behind inference.py: one streamed answer, or batched answers for a JSONL file of prompts.

Prompt rows hold "instruction" (non-empty) and optionally "input", or a conversation ("messages"); other fields
are carried through. Each output row is the prompt row plus "output" (the answer), "tokens" and "stopped" (false
when the answer was cut at MAX_NEW_TOKENS); a row's own "output" is kept as "reference". A conversation is
answered after its last user turn: one that ends with an assistant turn (a training row) is answered from the
turns before it, and that turn is its "reference".
"""

from __future__ import annotations

import time
from pathlib import Path

from .artifacts import Output, atomic_file, build_manifest, claim_outputs, sha256_file
from .cli import UserError
from .fast_generation import generation_path, load_generation_model, resolve_fast_generation
from .formats import check_format
from .generation import decoding_settings, generate_batch, stream_reply
from .modeling import chosen_base_path
from .records import PROMPT_HELP, iter_json_rows, json_line, validate_record
from .template import build_messages, is_conversation, prompt_ids, reference_answer


def read_prompt_rows(path: str, dataset_format: str = "auto") -> list[tuple[int, dict]]:
    """(line, {"row": the row as read, "record": its prompt record}) for each prompt row of `path` (- = stdin). The
    row's other fields (an id, a reference output) are carried through to the answers, so none is ignored."""
    check_format(dataset_format)
    where = "<stdin>" if path == "-" else path
    rows = [
        (line, {"row": row, "record": validate_record(row, f"{where}:{line}", False, dataset_format)})
        for line, row in iter_json_rows(path)
    ]
    if not rows:
        raise UserError(f"{where}: holds no rows; {PROMPT_HELP}")
    return rows


def model_context(model) -> int | None:
    """Tokens the model can attend to (prompt + answer), from its config; None when it does not say."""
    return getattr(model.config, "max_position_embeddings", None)


def fit_context(prompt_lengths: list[int], max_new_tokens: int, context: int | None, where: list[str]) -> int:
    """MAX_NEW_TOKENS, lowered (with a line) so that the longest prompt and its answer fit the model's context;
    a prompt that leaves no room for an answer is a UserError naming it."""
    if context is None:
        return max_new_tokens
    longest = max(range(len(prompt_lengths)), key=prompt_lengths.__getitem__)
    if prompt_lengths[longest] >= context:
        raise UserError(
            f"{where[longest]}: the prompt is {prompt_lengths[longest]:,} tokens but the model's context is "
            f"{context:,} (max_position_embeddings); shorten it"
        )
    room = context - prompt_lengths[longest]
    if room < max_new_tokens:
        print(f"max_new_tokens lowered from {max_new_tokens} to {room}: the longest prompt ({where[longest]}) is "
              f"{prompt_lengths[longest]:,} tokens of the model's {context:,}-token context")
        return room
    return max_new_tokens


def answer_row(item: dict, result: dict) -> dict:
    """The row as read, its answer in "output", and the answer it held (if any) in "reference"."""
    row, record = item["row"], item["record"]
    answered = {key: value for key, value in row.items() if key != "output"}
    if isinstance(row.get("output"), str):
        answered["reference"] = row["output"]
    elif isinstance(row.get("completion"), str):
        answered["reference"] = row["completion"]
    elif is_conversation(record) and record["messages"][-1]["role"] == "assistant":
        answered["reference"] = reference_answer(record)
    return {**answered, "output": result["text"], "tokens": result["tokens"], "stopped": result["stopped"]}


def load_model(cfg):
    chosen_base_path(cfg.adapter_dir, cfg.adapter_manifest, cfg.base_model)  # a trained base that is gone: one line
    return load_generation_model(cfg.adapter_dir, base_model=cfg.base_model, backend=cfg.backend,
                                 fast_generation=cfg.fast_generation, load_in_4bit=cfg.load_in_4bit,
                                 max_seq_length=cfg.max_seq_length)


def answer_one(cfg) -> None:
    """Stream the answer to INSTRUCTION (+ INPUT) to stdout."""
    if not cfg.instruction.strip():
        raise UserError("--instruction is empty; give a question (or --instruction_file PATH, - for stdin)")
    model, tokenizer, loaded = load_model(cfg)
    print(f"backend: {loaded['backend_loaded']} (base model {loaded['base_model']}, adapter {cfg.adapter_dir}); "
          f"{generation_path(loaded)}")
    messages = build_messages({"instruction": cfg.instruction, "input": cfg.input}, cfg.system_prompt)
    decoding = decoding_settings(cfg)
    decoding["max_new_tokens"] = fit_context([len(prompt_ids(tokenizer, messages))], cfg.max_new_tokens,
                                             model_context(model), ["--instruction/--input"])
    print(f"\n[question]\n{messages[1]['content']}\n\n[answer]", flush=True)
    reply = stream_reply(model, tokenizer, messages, on_text=lambda piece: print(piece, end="", flush=True),
                         **decoding)
    print()
    if reply.interrupted:
        print("[stopped by Ctrl-C]")
        raise SystemExit(130)
    if not reply.stopped:
        print(f"[answer cut at max_new_tokens {decoding['max_new_tokens']}]")


def answer_file(cfg) -> None:
    """Answer every row of INSTRUCTION_FILE in batches and write OUTPUT_FILE (+ its manifest) atomically."""
    inputs = {"--adapter_dir": cfg.adapter_dir, "--instruction_file": "" if cfg.instruction_file == "-" else
              cfg.instruction_file}
    with claim_outputs(inputs, [Output("--output_file", cfg.output_file)], "inference", cfg.overwrite_output) as \
            targets:
        _answer_file(cfg, targets["--output_file"])


def _answer_file(cfg, output_file: Path) -> None:
    where = "<stdin>" if cfg.instruction_file == "-" else cfg.instruction_file
    numbered = read_prompt_rows(cfg.instruction_file, cfg.dataset_format)
    rows = [row for _, row in numbered]
    model, tokenizer, loaded = load_model(cfg)
    print(f"backend: {loaded['backend_loaded']} (base model {loaded['base_model']}); {len(rows)} prompts "
          f"from {cfg.instruction_file}, batches of {cfg.batch_size}; {generation_path(loaded)}")
    conversations = [build_messages(row["record"], cfg.system_prompt) for row in rows]
    tools = [row["record"].get("tools") for row in rows]
    decoding = decoding_settings(cfg)
    decoding["max_new_tokens"] = fit_context(
        [len(prompt_ids(tokenizer, messages, row_tools)) for messages, row_tools in zip(conversations, tools)],
        cfg.max_new_tokens, model_context(model), [f"{where}:{line}" for line, _ in numbered],
    )
    started = time.time()
    results = generate_batch(model, tokenizer, conversations, batch_size=cfg.batch_size, progress="answers",
                             tools=tools, **decoding)
    cut = sum(not result["stopped"] for result in results)
    source = {"path": cfg.instruction_file}
    if cfg.instruction_file != "-":
        source["sha256"] = sha256_file(cfg.instruction_file)

    def describe(written):
        return build_manifest(
            "inference", cfg, adapter_dir=cfg.adapter_dir, base_model=loaded["base_model"],
            backend=loaded["backend_loaded"], fast_generation=loaded["fast_generation"],
            instruction_file=source, rows=len(rows), cut_at_max_new_tokens=cut,
            output={"path": str(cfg.output_file), "rows": len(rows), "sha256": sha256_file(written)},
            wall_time_s=round(time.time() - started, 2),
        )

    with atomic_file(output_file, manifest=describe) as handle:
        for row, result in zip(rows, results):
            handle.write(json_line(answer_row(row, result)))
    print(f"{len(rows)} answers written to {cfg.output_file} ({cut} cut at max_new_tokens "
          f"{decoding['max_new_tokens']})")


def run_inference(cfg) -> None:
    resolve_fast_generation(cfg.fast_generation)
    if cfg.instruction_file:
        answer_file(cfg)
    else:
        answer_one(cfg)
