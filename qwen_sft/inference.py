"""The inference stage behind inference.py: one streamed answer, or batched answers for a JSONL file of prompts.

Prompt rows hold "instruction" (non-empty) and optionally "input", or a conversation ("messages"); other fields
are carried through. Each output row is the prompt row plus "output" (the answer), "tokens" and "stopped" (false
when the answer was cut at MAX_NEW_TOKENS); a row's own "output" is kept as "reference". A conversation is
answered after its last user turn: one that ends with an assistant turn (a training row) is answered from the
turns before it, and that turn is its "reference".
"""

from __future__ import annotations

import json
import time

from .artifacts import atomic_file, build_manifest, manifest_path_for, sha256_file, write_json_atomic
from .cli import UserError
from .fast_generation import generation_path, load_generation_model, resolve_fast_generation
from .generation import decoding_settings, generate_batch, stream_reply
from .modeling import read_adapter_manifest
from .records import PROMPT_HELP, iter_json_rows, validate_record
from .template import build_messages, is_conversation, reference_answer

def read_prompt_rows(path: str) -> list[dict]:
    where = "<stdin>" if path == "-" else path
    # Other fields (an id, a reference output) are carried through to the answers.
    rows = [
        {**row, **validate_record(row, f"{where}:{line}", with_output=False)} for line, row in iter_json_rows(path)
    ]
    if not rows:
        raise UserError(f"{where}: holds no rows; {PROMPT_HELP}")
    return rows


def answer_row(row: dict, result: dict) -> dict:
    answered = {key: value for key, value in row.items() if key != "output"}
    if "output" in row:
        answered["reference"] = row["output"]
    elif is_conversation(row) and row["messages"][-1]["role"] == "assistant":
        answered["reference"] = reference_answer(row)
    return {**answered, "output": result["text"], "tokens": result["tokens"], "stopped": result["stopped"]}


def answer_one(cfg) -> None:
    """Stream the answer to INSTRUCTION (+ INPUT) to stdout."""
    if not cfg.instruction.strip():
        raise UserError("--instruction is empty; give a question (or --instruction_file PATH, - for stdin)")
    model, tokenizer, manifest = load_generation_model(cfg.adapter_dir, cfg.backend, cfg.fast_generation)
    print(f"backend: {manifest['backend_loaded']} (base model {manifest['base_model']}, adapter {cfg.adapter_dir}); "
          f"{generation_path(manifest)}")
    messages = build_messages({"instruction": cfg.instruction, "input": cfg.input}, cfg.system_prompt)
    print(f"\n[question]\n{messages[1]['content']}\n\n[answer]", flush=True)
    reply = stream_reply(model, tokenizer, messages, on_text=lambda piece: print(piece, end="", flush=True),
                         **decoding_settings(cfg))
    print()
    if reply.interrupted:
        print("[stopped by Ctrl-C]")
        raise SystemExit(130)
    if not reply.stopped:
        print(f"[answer cut at max_new_tokens {cfg.max_new_tokens}]")


def answer_file(cfg) -> None:
    """Answer every row of INSTRUCTION_FILE in batches and write OUTPUT_FILE (+ its manifest) atomically."""
    read_adapter_manifest(cfg.adapter_dir)  # a missing adapter is reported before stdin is read
    rows = read_prompt_rows(cfg.instruction_file)
    model, tokenizer, manifest = load_generation_model(cfg.adapter_dir, cfg.backend, cfg.fast_generation)
    print(f"backend: {manifest['backend_loaded']} (base model {manifest['base_model']}); {len(rows)} prompts "
          f"from {cfg.instruction_file}, batches of {cfg.batch_size}; {generation_path(manifest)}")
    started = time.time()
    results = generate_batch(
        model, tokenizer, [build_messages(row, cfg.system_prompt) for row in rows], batch_size=cfg.batch_size,
        progress="answers", **decoding_settings(cfg),
    )
    with atomic_file(cfg.output_file) as handle:
        for row, result in zip(rows, results):
            handle.write(json.dumps(answer_row(row, result), ensure_ascii=False) + "\n")
    cut = sum(not result["stopped"] for result in results)
    source = {"path": cfg.instruction_file}
    if cfg.instruction_file != "-":
        source["sha256"] = sha256_file(cfg.instruction_file)
    write_json_atomic(
        manifest_path_for(cfg.output_file),
        build_manifest(
            "inference", cfg, adapter_dir=cfg.adapter_dir, base_model=manifest["base_model"],
            backend=manifest["backend_loaded"], fast_generation=manifest["fast_generation"], instruction_file=source, rows=len(rows), cut_at_max_new_tokens=cut,
            wall_time_s=round(time.time() - started, 2),
        ),
    )
    print(f"{len(rows)} answers written to {cfg.output_file} ({cut} cut at max_new_tokens {cfg.max_new_tokens})")


def run_inference(cfg) -> None:
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {cfg.batch_size}")
    resolve_fast_generation(cfg.fast_generation)
    if cfg.instruction_file:
        answer_file(cfg)
    else:
        answer_one(cfg)
