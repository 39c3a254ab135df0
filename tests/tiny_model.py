"""A tiny Qwen2-style causal LM and a byte-level BPE tokenizer, built locally (no downloads), HF format."""

from __future__ import annotations

import torch


def build_tiny_model(path: str, vocab: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0,
                     tokenizer_size: int | None = None) -> None:
    """``tokenizer_size``: a word-level tokenizer of exactly that many tokens (e.g. a real model's ``len(tokenizer)``
    under a padded head: Qwen2.5's 151665 under 151936 rows) instead of the small BPE one trained here."""
    assert vocab > 112 and hidden % 4 == 0, (vocab, hidden)  # BPE merges need room; 4 attention heads
    assert tokenizer_size is None or 3 <= tokenizer_size <= vocab, (tokenizer_size, vocab)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if tokenizer_size is not None:
        words = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(3, tokenizer_size)])}
        tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        corpus = [f"the quick brown fox {i} jumps over the lazy dog {i * 7} times" for i in range(200)]
        trainer = trainers.BpeTrainer(vocab_size=vocab - 112, special_tokens=["<pad>", "<eos>", "<unk>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(corpus, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    hf_tok.save_pretrained(path)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=hf_tok.pad_token_id, eos_token_id=hf_tok.eos_token_id,
                      bos_token_id=hf_tok.eos_token_id)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).to(torch.float32).save_pretrained(path)


@torch.no_grad()
def full_logits(path: str, input_ids: list) -> list:
    """fp64 logits ``[S_i, V]`` of the saved model for each sequence (plain HF forward, fp32 weights)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    return [model(ids[None]).logits[0].double() for ids in input_ids]
