"""Train the embedded demo checkpoint: a tiny Gemma3n that has memorized the Zen of Python.

    python examples/train_demo.py [OUT]          # default OUT: examples/zen-gemma3n

Writes a Hugging Face layout checkpoint (config.json, model.safetensors with
`model.language_model.*` keys, tokenizer.json, tokenizer_config.json, generation_config.json)
that `python -m convert` accepts like any Gemma3n checkpoint. The text is the standard library's
`this` module; the tokenizer is a byte-level BPE trained here with the `tokenizers` library, with
Gemma's special tokens, so any text round-trips. The model is transformers' Gemma3nForCausalLM in
float32 on CPU, seeds fixed; training stops as soon as the model reproduces the whole text
greedily from its beginning and from the demo prompt "Beautiful is better than" (a few minutes
on 2 cores). Training windows start anywhere in the text, so other prompts mostly work too.

The committed checkpoint under examples/zen-gemma3n/ was produced by this script, so tests and CI
never need to train.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

SEED = 0
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN = range(len(SPECIAL_TOKENS))
VOCAB_SIZE = 512
BATCH = 16
MAX_STEPS = 2000
PROMPT = "Beautiful is better than"  # the README's demo prompt
MIN_CONTEXT = 3  # tokens of context after which the checked continuations must be exact

# Ten layers with the last four KV-shared and every fifth full, as in tests/checkpoints.py: one
# full and one sliding layer precede the shared ones (docs/GEMMA3N.md, pitfalls). The sliding window is
# shorter than the text, so the runtime's rotating cache is exercised; the first layers are sparse.
LAYERS = 10
TEXT_CONFIG = {
    "model_type": "gemma3n_text",
    "vocab_size": VOCAB_SIZE,
    "vocab_size_per_layer_input": VOCAB_SIZE,
    "hidden_size": 64,
    "hidden_size_per_layer_input": 16,
    "intermediate_size": [128] * LAYERS,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "num_kv_shared_layers": 4,
    "laurel_rank": 8,
    "altup_num_inputs": 4,
    "altup_active_idx": 0,
    "altup_coef_clip": 120.0,
    "altup_correct_scale": True,
    "sliding_window": 16,
    "layer_types": ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(LAYERS)],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "activation_sparsity_pattern": [0.95] * 3 + [0.0] * (LAYERS - 3),
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "pad_token_id": PAD,
    "eos_token_id": [EOS, END_OF_TURN],
    "bos_token_id": BOS,
}

# Gemma3n's own chat template (google/gemma-3n-E2B-it), so the demo bundle renders chats as a real one.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'audio' -%}\n"
    "                {{ '<audio_soft_token>' }}\n"
    "            {%- elif item['type'] == 'image' -%}\n"
    "                {{ '<image_soft_token>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


def zen_text() -> str:
    """The Zen of Python as the standard library stores it (rot13 in `this.s`)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the text
        import this
    return codecs.decode(this.s, "rot13")


def train_tokenizer(text: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=1, show_progress=False)
    tok.train_from_iterator([text], trainer)
    # Like Gemma's tokenizer: encoding with special tokens prepends <bos>.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", BOS)])
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    assert tok.decode(tok.encode(text).ids) == text
    return tok


def windows(ids: list[int], starts) -> tuple[torch.Tensor, torch.Tensor]:
    """[<bos>] + ids[s:] for each start, padded; labels -100 on padding."""
    length = 1 + max(len(ids) - s for s in starts)
    x = torch.full((len(starts), length), PAD, dtype=torch.long)
    for row, s in enumerate(starts):
        piece = [BOS] + ids[s:]
        x[row, :len(piece)] = torch.tensor(piece)
    labels = x.clone()
    labels[x == PAD] = -100
    return x, labels


def checked_starts(ids: list[int], prompt_ids: list[int]) -> list[int]:
    """Where greedy decoding must follow the text: from the very beginning, and from the demo
    prompt. (Not from any point: "If the implementation is" continues two ways.)"""
    at = [s for s in range(len(ids)) if ids[s:s + len(prompt_ids)] == prompt_ids]
    assert len(at) == 1, at
    return [0, at[0]]


@torch.no_grad()
def continuations_exact(model, ids: list[int], starts: list[int]) -> tuple[bool, float]:
    """Teacher-forced argmax from each start, checked once the context holds MIN_CONTEXT text
    tokens: if every one is right, greedy decoding from such a prompt reproduces the rest of the
    text. Also returns the smallest gap between the right logit and the runner-up."""
    model.eval()
    x, labels = windows(ids, starts)
    logits = model(input_ids=x).logits[:, :-1]
    target = labels[:, 1:]
    checked = target != -100
    checked[:, :MIN_CONTEXT] = False
    top2 = logits.topk(2, dim=-1)
    right = top2.indices[..., 0] == target
    gap = top2.values[..., 0] - top2.values[..., 1]
    model.train()
    return bool((right | ~checked).all()), float(gap[checked & right].min())


def train(out: Path) -> None:
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)  # tiny gradients late in training turn slow as denormals
    torch.use_deterministic_algorithms(True)

    text = zen_text()
    tokenizer = train_tokenizer(text)
    ids = tokenizer.encode(text, add_special_tokens=False).ids + [EOS]
    starts_checked = checked_starts(ids, tokenizer.encode(PROMPT, add_special_tokens=False).ids)
    print(f"text: {len(text)} characters, {len(ids)} tokens with <eos>", file=sys.stderr)

    config = Gemma3nTextConfig(**TEXT_CONFIG)
    model = Gemma3nForCausalLM(config).float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 100))
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.perf_counter()
    for step in range(1, MAX_STEPS + 1):
        starts = torch.randint(0, len(ids) - 1, (BATCH,), generator=gen).tolist()
        starts[0] = 0  # always the whole text, so every batch trains every position
        x, labels = windows(ids, starts)
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f}, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if step % 100 == 0:
            done, margin = continuations_exact(model, ids, starts_checked)
            print(f"step {step}: exact {done}, smallest margin {margin:.2f}, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
            if done and margin > 1.0:
                break
    else:
        raise SystemExit("training did not converge; raise MAX_STEPS")
    save(out, model, tokenizer)


def save(out: Path, model, tokenizer: Tokenizer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Hugging Face layout of Gemma3nForConditionalGeneration: the decoder under
    # model.language_model.*, the LM head tied to the embedding (not stored).
    tensors = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        assert name.startswith("model."), name
        tensors["model.language_model." + name[len("model."):]] = value.detach().contiguous().clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "text_config": TEXT_CONFIG,
        "eos_token_id": [EOS, END_OF_TURN],
        "bos_token_id": BOS,
        "pad_token_id": PAD,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": [EOS, END_OF_TURN], "pad_token_id": PAD, "do_sample": False},
        indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": TEXT_CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent / "zen-gemma3n"
    train(out)


if __name__ == "__main__":
    main(sys.argv)
