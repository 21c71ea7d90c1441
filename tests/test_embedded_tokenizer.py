"""The embedded tokenizer: one id per character, and the same ids after a save and an AutoTokenizer reload
next to the embedded (qwen2) model, which is how a trained run's output folder is read back."""

from transformers import AutoTokenizer

from posttrain.data import embedded

TEXT = "".join(embedded.CHARACTERS) + " 12 + 3 = 15\n<|im_start|>assistant\n15<|im_end|>"


def test_one_id_per_character_and_exact_decode():
    tokenizer = embedded.build_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    specials = {1, 2}  # <|im_start|>, <|im_end|>
    plain = TEXT.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert len(ids) == len(plain) + 2 and sum(i in specials for i in ids) == 2
    chars = [i for i in ids if i not in specials]
    assert chars == [3 + embedded.CHARACTERS.index(c) for c in plain]
    assert tokenizer.decode(ids) == TEXT


def test_saved_next_to_the_model_reloads_with_the_same_ids(tmp_path):
    tokenizer = embedded.build_tokenizer()
    embedded.build_model().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert reloaded.decode(reloaded(TEXT)["input_ids"]) == TEXT
    messages = [{"role": "user", "content": "1 + 2 =\n?"}, {"role": "assistant", "content": "3"}]
    assert reloaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
