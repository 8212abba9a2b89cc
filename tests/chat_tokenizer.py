"""A tokenizer made locally with a chat template, for the data tests: one token per character, specials
``<pad> <s> </s> <unk> <|user|> <|assistant|> <|system|> <|end|>``, BOS added to every text, and a template that
writes BOS itself (as Llama's do) and ends each turn with ``<|end|>\\n``."""
import string

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def chat_tokenizer(*, eos: str = "</s>", chat_template: str | None = CHAT_TEMPLATE):
    """A PreTrainedTokenizerFast; ``eos="<|end|>"`` makes the template's end of turn the EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS)}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token=eos, pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama(tokenizer, folder=None):
    """A 2-layer LlamaForCausalLM for ``tokenizer`` (saved with it to ``folder`` when given)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    if folder is not None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return model
