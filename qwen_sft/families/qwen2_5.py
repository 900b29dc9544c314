"""Qwen2.5 (Qwen/Qwen2.5-*-Instruct): its chat template, tokens, export templates and size estimates."""

from pathlib import Path

NAME = "Qwen2.5"
MODEL_TYPE = "qwen2"  # transformers' config.model_type, which the `tiny` stand-in is built as
CHAT_TEMPLATE_PATH = Path(__file__).with_name("qwen2_5_chat_template.jinja")  # the official one, byte for byte

END_OF_TURN = "<|im_end|>"  # closes every turn; the tokenizer's EOS, and the last token that carries loss
END_OF_TEXT = "<|endoftext|>"  # the pad token, and where a base (non-instruct) model stops
SPECIAL_TOKENS = [  # ids 151643-151656, after the 151,643 byte-level BPE ranks
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
ADDED_NOT_SPECIAL = [  # ids 151657-151664: added (never split) but not special (kept when decoding)
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"  # around the JSON of each call an assistant makes
TOKENIZER_CLASS = "Qwen2Tokenizer"  # as the hub's tokenizer_config.json names it (transformers 4.x loads it)
VOCAB_SIZE = 151936  # embedding rows of the 0.5B-7B models: the 151,665 tokens padded to a multiple of 128
# Qwen/Qwen2.5-7B-Instruct's config.json: the shape the GPU benchmarks build with random weights
SHAPE_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False,
)

# The data stage's length estimate, measured by bench/bytes_per_token.py. The tokenizer averages about 4 UTF-8 bytes
# per token on English prose and on Chinese alike (code: ~3.5); 3 over-counts tokens, so a row under the byte
# budget fits MAX_SEQ_LENGTH.
BYTES_PER_TOKEN = 3.0
TEMPLATE_TOKENS = 32  # ChatML markers, role names and the 补充信息 heading around the three fields
EXCHANGE_TEMPLATE_TOKENS = 12  # ChatML markers and role names of each further exchange of a conversation

GGUF_PRE_TOKENIZER = "qwen2"  # what llama.cpp's converter must record for this vocabulary
# ChatML, as the chat template renders system/user/assistant turns, in Ollama's Go template language.
OLLAMA_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""
