"""Does llama.cpp run our GGUF as transformers runs the merged folder? A one-off check, not in CI (building
llama.cpp takes about 15 minutes on 2 cores).

For 5 ChatML prompts (rendered by the exported tokenizer's chat template), it compares:
- tokenization: llama.cpp's `tokenize(text, special=True)` against the Hugging Face tokenizer's ids;
- 16 greedy tokens (argmax at every step, no stop token) from an f32 GGUF under llama.cpp, against transformers in
  fp32 on the merged folder.
llama.cpp runs through llama-cpp-python (which builds llama.cpp itself) in its own Python environment.

  python export_model.py --dtype float32 --gguf f32 --output_dir /tmp/parity
  pip install llama-cpp-python==0.3.36          # in another venv: LLAMA_PYTHON
  python bench/llama_cpp_parity.py --merged /tmp/parity --llama_python /path/to/venv/bin/python --out parity.json
"""

import argparse
import json
import subprocess
from pathlib import Path

from qwen_sft.families import family

NEW_TOKENS = 16
CONVERSATIONS = [
    [{"role": "user", "content": "报告0中的晶圆良率是多少？"}],
    [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "Explain LoRA in one sentence."}],
    [{"role": "user", "content": "Report 1: what was the power?\n\n补充信息：\nQ2 summary: power reached 87%."}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "12345 × 678?"}],
    [{"role": "user", "content": f"café naïve 😀 — “quotes” {family.ADDED_NOT_SPECIAL[0]}"}],  # an added token
]
LLAMA_SIDE = """
import json, sys
from llama_cpp import Llama
job = json.load(sys.stdin)
llm = Llama(model_path=job["gguf"], n_ctx=512, n_threads=2, logits_all=False, verbose=False)
out = []
for text, ids in zip(job["texts"], job["ids"]):
    tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.reset()
    generated = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        generated.append(token)
        if len(generated) == job["new_tokens"]:
            break
    out.append({"tokens": tokens, "generated": generated})
print(json.dumps(out))
"""


def transformers_greedy(merged: str, prompts: list[list[int]]) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    answers = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for _ in range(NEW_TOKENS):
                next_id = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            answers.append(ids[0, len(prompt):].tolist())
    return answers


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merged", required=True, help="export_model.py's folder, with --dtype float32 --gguf f32")
    parser.add_argument("--llama_python", required=True, help="a Python with llama-cpp-python installed")
    parser.add_argument("--out", default="llama_cpp_parity.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.merged)
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    job = {"gguf": str(Path(args.merged) / "model-f32.gguf"), "texts": texts, "ids": ids, "new_tokens": NEW_TOKENS}
    result = subprocess.run([args.llama_python, "-c", LLAMA_SIDE], input=json.dumps(job), capture_output=True,
                            text=True, check=True)
    llama = json.loads(result.stdout.strip().splitlines()[-1])
    hf = transformers_greedy(args.merged, ids)
    rows = [{"prompt_tokens": len(prompt), "tokenization_identical": side["tokens"] == prompt,
             "generation_identical": side["generated"] == answer, "llama_cpp": side["generated"], "transformers": answer}
            for prompt, side, answer in zip(ids, llama, hf)]
    record = {"new_tokens": NEW_TOKENS, "prompts": len(rows),
              "tokenization_identical": sum(row["tokenization_identical"] for row in rows),
              "generation_identical": sum(row["generation_identical"] for row in rows), "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"tokenization identical {record['tokenization_identical']}/5, "
          f"{NEW_TOKENS} greedy tokens identical {record['generation_identical']}/5; record {args.out}")


if __name__ == "__main__":
    main()
