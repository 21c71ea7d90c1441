"""Assistant masks on real models' chat templates, against TRL 1.16's SFTTrainer.

Reference: TRL's own path for `assistant_only_loss=True` — `SFTTrainer` swaps in its marked "training" template
(`get_training_chat_template`) and takes `return_assistant_tokens_mask` from it; its collator turns the masks
into labels. Compared: input_ids and `labels != -100`, token for token, with `tokenize_sft(...,
assistant_only_loss=True)`, which renders with the model's own template and derives the masks (no template of
ours, no list of known families). The templates' text is read from TRL's package data, never copied here; the
tokenizers are byte-level BPEs built in code with each family's special tokens.

Every template TRL can patch (`get_training_chat_template`'s mapping, read from TRL's source) is run single- and
multi-turn; `EXPECTED` states per template whether the result equals TRL's or by which rule of the tokenization
module docstring it differs, and `difference` asserts the exact differing tokens: TRL trains markup that the
generation prompt already holds (the model never writes it); TRL's Qwen3 training templates keep an earlier
turn's empty think block that the model's template drops (other input_ids); GLM-4's closes no turn, so TRL's
appends and trains the next header; llava_next's trailing space after "</s>".
"""

import difflib
import functools
import json
import pathlib
import re
import tempfile
import warnings

import pytest
import trl
from datasets import Dataset

from posttrain.data import embedded
from posttrain.data.tokenization import tokenize_conversation, tokenize_conversations, tokenize_sft

TEMPLATES = pathlib.Path(trl.__file__).parent / "chat_templates"
U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}
S = lambda text: {"role": "system", "content": text}

# family: (special tokens, bos, eos, end-of-turn token)
FAMILIES = {
    "qwen2_5": (["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>"], None, "<|im_end|>", "<|im_end|>"),
    "qwen3_instruct_2507": (["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>"], None, "<|im_end|>", "<|im_end|>"),
    "qwen3": (["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>"], None, "<|im_end|>", "<|im_end|>"),
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "gemma3": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "phi3": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], None, "<|endoftext|>", "<|end|>"),
    "cohere": (["<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"], "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
    "lfm2": (["<|startoftext|>", "<|im_start|>", "<|im_end|>"], "<|startoftext|>", "<|im_end|>", "<|im_end|>"),
    "deepseekv3": (["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>"], "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
}  # fmt: skip


def generation_prompt_pieces(family) -> list[str]:
    """What TRL's training template trains per assistant turn that the generation prompt holds (see `EXPECTED`)."""
    rule, piece = EXPECTED[family]
    return [piece] if rule == "generation prompt" else []


CONVERSATIONS = [
    [U("Hello there"), A("I am fine.")],
    [S("Be brief."), U("What is 2 + 2?"), A("It is 4.")],
    [U("What is 2 + 2?"), A("It is 4."), U("how are you today?"), A("Hello, fine.")],
    [U("hi"), A(" The quick\n\nbrown fox "), U("and?")],  # edge whitespace; ends on a user turn
]
CORPUS = [
    "Hello there, how are you today? I am fine.",
    "What is 2 + 2? It is 4.",
    "def f(x):\n    return x\n",
]


def build_tokenizer(specials, bos, eos, template):
    """A byte-level BPE (merges learnt from a small corpus, so tokens cross the template's whitespace)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        additional_special_tokens=[t for t in specials if t not in (bos, eos)],
    )
    tokenizer.chat_template = template
    return tokenizer


def family_tokenizer(family):
    specials, bos, eos, _ = FAMILIES[family]
    return build_tokenizer(specials, bos, eos, (TEMPLATES / f"{family}.jinja").read_text())


def trl_reference(tokenizer, dataset, **config):
    """TRL's prepared rows: (input_ids, labels != -100) per row, from its SFTTrainer and collator."""
    from trl import SFTConfig, SFTTrainer

    model = embedded.build_model(vocab_size=len(tokenizer))
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, use_cpu=True, bf16=False, report_to=[], shuffle_dataset=False, **config
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        labels = trainer.data_collator(rows)["labels"]
    return [
        (r["input_ids"], (labels[i, : len(r["input_ids"])] != -100).long().tolist())
        for i, r in enumerate(rows)
    ]


def assert_equal_up_to_generation_prompt(tokenizer, ours, theirs, pieces, n_turns):
    """Ours equals TRL's but for `pieces` (per assistant turn) that TRL trains and we do not."""
    assert [ids for ids, _ in ours] == [ids for ids, _ in theirs]
    differ = [
        tokenizer.decode([ids[t]])
        for (ids, mine), (_, ref) in zip(ours, theirs, strict=True)
        for t in range(len(ids))
        if mine[t] != ref[t]
    ]
    assert all(
        ours_bit <= ref_bit
        for (_, m), (_, r) in zip(ours, theirs, strict=True)
        for ours_bit, ref_bit in zip(m, r, strict=True)
    )
    assert sorted(differ) == sorted(pieces * n_turns)


def trained(tokenizer, ids, mask) -> str:
    """The text of the tokens a mask trains."""
    return tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])


def turns(mask):
    """[start, end) of each run of 1s."""
    runs, start = [], None
    for t, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = t
        elif not bit and start is not None:
            runs.append((start, t))
            start = None
    return runs


# qwen3: TRL keeps earlier turns' think blocks (other input_ids), see test_patchable_templates_against_trl.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen3"])
def test_masks_match_trl(family):
    tokenizer = family_tokenizer(family)
    # Gemma's template raises on a system message.
    conversations = [[m for m in c if m["role"] != "system" or family != "gemma"] for c in CONVERSATIONS]
    dataset = Dataset.from_list([{"messages": c} for c in conversations])
    theirs = trl_reference(tokenizer, dataset, max_length=None, assistant_only_loss=True)
    out, _ = tokenize_sft(dataset, tokenizer, max_length=None, assistant_only_loss=True)
    ours = [(r["input_ids"], r["completion_mask"]) for r in out]
    n_turns = sum(m["role"] == "assistant" for c in conversations for m in c)
    assert_equal_up_to_generation_prompt(tokenizer, ours, theirs, generation_prompt_pieces(family), n_turns)
    # Every assistant turn is trained through its end-of-turn token (and nothing after it but whitespace or,
    # for the last message of a conversation, the template's closing eos).
    end_of_turn = FAMILIES[family][3]
    for (ids, mask), conversation in zip(ours, conversations, strict=True):
        runs = turns(mask)
        assert len(runs) == sum(m["role"] == "assistant" for m in conversation)
        for start, end in runs:
            tokens = [tokenizer.decode([i]) for i in ids[start:end]]
            assert end_of_turn in tokens
            rest = tokens[tokens.index(end_of_turn) + 1 :]
            assert all(t.strip() == "" or t == tokenizer.eos_token for t in rest)


# ---------------------------------------------------------------------------------------------------------
# Every template TRL 1.16 can patch (its `get_training_chat_template` mapping), single- and multi-turn
# ---------------------------------------------------------------------------------------------------------

# The model templates TRL maps to a training template, read from its source so that a new one fails below.
PATCHABLE = sorted(
    set(
        re.findall(
            r"if chat_template == (\w+)_chat_template:",
            (TEMPLATES.parent / "chat_template_utils.py").read_text(),
        )
    )
)
SINGLE = [U("Hello there"), A("I am fine.")]
MULTI = [U("What is 2 + 2?"), A("It is 4."), U("how are you today?"), A("Hello, fine.")]
SPECIALS = re.compile(
    r"<\|[^|<>\s]{1,40}\|>|<\|[a-z_\"]{1,20}>|<[a-z_]{1,20}\|>|<｜[^<>]{1,40}｜>|</?[a-z_]{1,20}>|\[gMASK\]"
)
BOS = {
    "cohere": "<BOS_TOKEN>", "cohere2": "<BOS_TOKEN>", "deepseek_r1_distill": "<｜begin▁of▁sentence｜>",
    "deepseekv3": "<｜begin▁of▁sentence｜>", "diffusion_gemma": "<bos>", "gemma": "<bos>", "gemma3": "<bos>",
    "lfm2": "<|startoftext|>", "lfm2_v2": "<|startoftext|>", "llama3": "<|begin_of_text|>",
    "muse_glimmer": "<|begin_of_text|>",
}  # fmt: skip
EOS = {"phi3": "<|endoftext|>", "phi3_5": "<|endoftext|>", "glm4moe": "<|endoftext|>", "gptoss": "<|return|>"}
PARTS = {"llava_next"}  # its template reads content as a list of parts ({"type": "text", "text": ...})


@functools.cache
def patchable_tokenizer(name):
    """A byte-level BPE with the special tokens the template's text names (one build per module and template)."""
    template = (TEMPLATES / f"{name}.jinja").read_text()
    specials = sorted(set(SPECIALS.findall(template)) | {BOS.get(name, "<bos>")} | set(EOS.values()))
    eos = EOS.get(name) or next(t for t in specials if re.search("end|eot", t, re.I))
    return build_tokenizer(specials, BOS.get(name), eos, template)


def as_parts(messages):
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]


def difference(tokenizer, ours, theirs) -> dict:
    """How TRL's (input_ids, mask) differ from ours, token by token after aligning the two id lists.

    {"trl_ids": text that only TRL's input_ids hold, "ours_ids": text only ours hold, "trl_trains": tokens both
    hold that only TRL trains, "ours_trains": tokens both hold that only we train}; empty values are left out.
    """
    (ids, mask), (ref_ids, ref_mask) = ours, theirs
    out = {"trl_ids": "", "ours_ids": "", "trl_trains": [], "ours_trains": []}
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ids, b=ref_ids, autojunk=False).get_opcodes():
        if op != "equal":
            out["ours_ids"] += tokenizer.decode(ids[i1:i2])
            out["trl_ids"] += tokenizer.decode(ref_ids[j1:j2])
            continue
        for i, j in zip(range(i1, i2), range(j1, j2), strict=True):
            if mask[i] != ref_mask[j]:
                out["trl_trains" if ref_mask[j] else "ours_trains"].append(tokenizer.decode([ids[i]]))
    return {key: value for key, value in out.items() if value}


# Expected outcome per template: (rule, piece). "equal": masks and ids equal TRL's. "generation prompt": TRL trains
# `piece`, which the template's generation prompt holds, in every assistant turn; we do not. "dropped reasoning": as
# "generation prompt", and the model's template drops an earlier turn's empty think block, which TRL's training
# template keeps (its input_ids hold "<think>\n\n</think>\n\n" there, trained; the alignment shows it as
# "\n<think>\n\n</think>\n" plus the header's "\n"). "next header": the template closes no turn; TRL's training
# template appends `piece` after the last turn and trains the next message's header `piece` as the stop token; we
# keep the model's ids and warn. "trailing space": we train the space the template writes after "</s>" (the turn
# as it renders); TRL's training template moves it out of the turn.
EXPECTED = {
    "cohere": ("equal", ""), "cohere2": ("equal", ""), "diffusion_gemma": ("equal", ""), "gemma": ("equal", ""),
    "gemma3": ("equal", ""), "idefics3": ("equal", ""), "lfm2": ("equal", ""), "lfm2_v2": ("equal", ""),
    "llama3": ("equal", ""), "phi3": ("equal", ""), "phi3_5": ("equal", ""), "qwen2_5_vl": ("equal", ""),
    "qwen3_instruct_2507": ("equal", ""), "qwen3_vl": ("equal", ""), "smolvlm": ("equal", ""),
    "deepseek_r1_distill": ("generation prompt", "<｜Assistant｜>"),
    "deepseekv3": ("generation prompt", "<｜Assistant｜>"),
    "gptoss": ("generation prompt", "<|start|>assistant"),
    "muse_glimmer": ("generation prompt", "<|start|>assistant"),
    "nemotron_3_5_lightning": ("generation prompt", "<think>"),
    "nemotron_3_nano": ("generation prompt", "<think>"),
    "nemotron_3_super": ("generation prompt", "<think>"),
    "nemotron_3_ultra": ("generation prompt", "<think>"),
    "qwen2_5": ("generation prompt", "\n"),
    "qwen3_8": ("generation prompt", "<think>\n"),
    "qwen3": ("dropped reasoning", ""),
    "qwen3_5_nothink": ("dropped reasoning", "<think>\n\n</think>\n\n"),
    "qwen3_5_think": ("dropped reasoning", "<think>\n"),
    "qwen3_6": ("dropped reasoning", "<think>\n"),
    "glm4moe": ("next header", "<|user|>"),
    "llava_next": ("trailing space", " "),
}  # fmt: skip


def expected_difference(rule, piece, n_turns) -> dict:
    """`difference` as the rule predicts it for a conversation of n_turns assistant turns (joined to text)."""
    expected = {
        "equal": {},
        "generation prompt": {"trl_trains": piece * n_turns},
        "dropped reasoning": {"trl_ids": "\n<think>\n\n</think>\n", "trl_trains": "\n" + piece}
        if n_turns > 1
        else {"trl_trains": piece},
        "next header": {"trl_ids": piece, "trl_trains": piece * (n_turns - 1)},
        "trailing space": {"ours_trains": piece * n_turns},
    }[rule]
    return {key: value for key, value in expected.items() if value}


def test_every_patchable_template_is_listed():
    assert len(PATCHABLE) == 31 and sorted(EXPECTED) == PATCHABLE


@pytest.mark.parametrize("name", PATCHABLE)
def test_patchable_templates_against_trl(name):
    """Single- and multi-turn masks on each template TRL can patch, against its SFTTrainer on its training template."""
    tokenizer = patchable_tokenizer(name)
    conversations = [as_parts(c) if name in PARTS else c for c in (SINGLE, MULTI)]
    dataset = Dataset.from_list([{"messages": c} for c in conversations])
    theirs = trl_reference(tokenizer, dataset, max_length=None, assistant_only_loss=True)
    rule, piece = EXPECTED[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, masks = tokenize_conversations(
            tokenizer, conversations
        )  # llava_next's parts: not a tokenize_sft row
    assert any("never trains the model to stop" in str(w.message) for w in caught) == (rule == "next header")
    for conversation, ours, ref in zip(conversations, zip(ids, masks, strict=True), theirs, strict=True):
        got = {key: "".join(value) for key, value in difference(tokenizer, ours, ref).items()}
        assert got == expected_difference(rule, piece, sum(m["role"] == "assistant" for m in conversation))
    if name not in PARTS:  # the SFT path gives the same rows
        out, _ = tokenize_sft(dataset, tokenizer, max_length=None, assistant_only_loss=True)
        assert [(r["input_ids"], r["completion_mask"]) for r in out] == list(zip(ids, masks, strict=True))


def test_turns_rendered_differently_when_last():
    """gpt-oss closes a turn with "<|end|>" mid-conversation and "<|return|>" last; Qwen3.6 drops an earlier turn's
    reasoning. Each turn is trained as the whole conversation renders it."""
    gptoss = patchable_tokenizer("gptoss")
    ids, mask = tokenize_conversation(gptoss, MULTI)
    assert trained(gptoss, ids, mask) == (
        "<|channel|>final<|message|>It is 4.<|end|><|channel|>final<|message|>Hello, fine.<|return|>"
    )
    qwen = patchable_tokenizer("qwen3_6")
    ids, mask = tokenize_conversation(qwen, MULTI)
    text = qwen.decode(ids)
    assert (
        "<|im_start|>assistant\nIt is 4.<|im_end|>" in text
    )  # the model's rendering: no earlier think block
    assert [qwen.decode(ids[s:e]) for s, e in turns(mask)] == [
        "It is 4.<|im_end|>\n",
        "\n</think>\n\nHello, fine.<|im_end|>\n",  # after the generation prompt's "<think>\n"
    ]


@pytest.mark.parametrize("name", ["qwen3", "qwen3_5_nothink", "qwen3_5_think", "qwen3_6", "gptoss"])
def test_tool_calling_multi_turn_against_trl(name):
    """A tool call, its result, an answer, a new user message: Qwen3's templates drop the reasoning of both earlier
    turns only because a user message follows them (so messages[:k] alone renders them otherwise), gpt-oss closes the
    tool call with "<|call|>" and the answers with "<|end|>" / "<|return|>". Differences: the EXPECTED rules only."""
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    tools = [{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {}}}]
    conversation = [
        U("What is 2 + 2?"),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "add", "content": "4"},
        A("It is 4."),
        U("thanks"),
        A("You are welcome."),
    ]
    tokenizer = patchable_tokenizer(name)
    row = Dataset.from_list([{"messages": conversation, "tools": json.dumps(tools)}])
    (theirs,) = trl_reference(tokenizer, row, max_length=None, assistant_only_loss=True)
    ids, mask = tokenize_conversation(tokenizer, conversation, tools=tools)
    got = {key: "".join(value) for key, value in difference(tokenizer, (ids, mask), theirs).items()}
    rule, piece = EXPECTED[name]
    if rule == "dropped reasoning":  # both earlier turns' think blocks, in TRL's ids only
        assert got == {"trl_ids": "<think>\n\n</think>\n\n" * 2, **({"trl_trains": piece} if piece else {})}
    else:
        assert got == expected_difference(rule, piece, 3)
    spans = [tokenizer.decode(ids[s:e]) for s, e in turns(mask)]
    assert (
        spans[1:]
        == {
            "gptoss": [
                "<|channel|>final<|message|>It is 4.<|end|>",
                "<|channel|>final<|message|>You are welcome.<|return|>",
            ],
            "qwen3": ["It is 4.<|im_end|>\n", "<think>\n\n</think>\n\nYou are welcome.<|im_end|>\n"],
            "qwen3_5_nothink": ["It is 4.<|im_end|>\n", "You are welcome.<|im_end|>\n"],
            "qwen3_5_think": ["It is 4.<|im_end|>\n", "\n</think>\n\nYou are welcome.<|im_end|>\n"],
            "qwen3_6": ["It is 4.<|im_end|>\n", "\n</think>\n\nYou are welcome.<|im_end|>\n"],
        }[name]
    )
    assert spans[0].endswith("<|call|>" if name == "gptoss" else "</tool_call><|im_end|>\n")


@pytest.mark.parametrize(
    "name,key,spans,differs",
    [
        (
            "gptoss",
            "thinking",  # gpt-oss renders the analysis channel of the last turn only, in both templates
            [
                "<|channel|>final<|message|>It is 4.<|end|>",
                "<|channel|>analysis<|message|>Adding again.<|end|><|start|>assistant<|channel|>final<|message|>6.<|return|>",
            ],
            {"trl_trains": "<|start|>assistant" * 2},
        ),
        (
            "qwen3_6",
            "reasoning_content",  # the model's template drops the first turn's reasoning; TRL's keeps it
            ["It is 4.<|im_end|>\n", "Adding again.\n</think>\n\n6.<|im_end|>\n"],
            {"trl_ids": "\n<think>\nAdding.\n</think>\n", "trl_trains": "\n<think>\n"},
        ),
    ],
)
def test_reasoning_multi_turn_against_trl(name, key, spans, differs):
    """Turns with reasoning: each is trained as the model's template renders it in the conversation."""
    conversation = [
        U("What is 2 + 2?"),
        {"role": "assistant", "content": "It is 4.", key: "Adding."},
        U("and 3 + 3?"),
        {"role": "assistant", "content": "6.", key: "Adding again."},
    ]
    tokenizer = patchable_tokenizer(name)
    (theirs,) = trl_reference(
        tokenizer, Dataset.from_list([{"messages": conversation}]), max_length=None, assistant_only_loss=True
    )
    ids, mask = tokenize_conversation(tokenizer, conversation)
    assert [tokenizer.decode(ids[s:e]) for s, e in turns(mask)] == spans
    got = {key: "".join(value) for key, value in difference(tokenizer, (ids, mask), theirs).items()}
    assert got == differs


def test_multi_turn_prompt_completion_matches_trl():
    """Conversational prompt-completion with assistant_only_loss: both masks at once, as TRL."""
    tokenizer = family_tokenizer("llama3")
    rows = [
        {"prompt": [U("What is 2 + 2?"), A("It is 4."), U("and 3 + 3?")], "completion": [A("6")]},
        {"prompt": [S("Be brief."), U("hi")], "completion": [A("Hello"), U("again"), A("Hello again")]},
    ]
    for options in ({}, {"completion_only_loss": False}):
        theirs = trl_reference(
            tokenizer, Dataset.from_list(rows), max_length=None, assistant_only_loss=True, **options
        )
        out, _ = tokenize_sft(
            Dataset.from_list(rows), tokenizer, max_length=None, assistant_only_loss=True, **options
        )
        assert [(r["input_ids"], r["completion_mask"]) for r in out] == theirs


def test_tool_calls_and_tool_roles_match_trl():
    """OpenAI tool-calling rows (content None + tool_calls, `tool` messages, a `tools` column) as TRL renders them."""
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
    tools = '[{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {}}}]'
    conversation = [
        U("What is 2 + 2?"),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "4"},
        A("It is 4."),
    ]
    rows = [{"messages": conversation, "tools": tools}, {"messages": [U("hi"), A("Hello")], "tools": tools}]
    for family in ("qwen2_5", "qwen3_instruct_2507"):
        tokenizer = family_tokenizer(family)
        rendered = tokenizer.decode(tokenize_conversation(tokenizer, conversation, tools=tools)[0])
        assert (
            '<tool_call>\n{"name": "add"' in rendered and "<tool_response>\n4\n</tool_response>" in rendered
        )
        for options in ({}, {"assistant_only_loss": True}):
            theirs = trl_reference(tokenizer, Dataset.from_list(rows), max_length=None, **options)
            out, _ = tokenize_sft(Dataset.from_list(rows), tokenizer, max_length=None, **options)
            ours = [(r["input_ids"], r["completion_mask"]) for r in out]
            pieces = generation_prompt_pieces(family) if options else []
            assert_equal_up_to_generation_prompt(tokenizer, ours, theirs, pieces, 3)
            # As prompt-completion: the first turn's header is in the prompt, so only the second turn differs.
            pc = Dataset.from_list(
                [{"prompt": conversation[:1], "completion": conversation[1:], "tools": tools}]
            )
            theirs = trl_reference(tokenizer, pc, max_length=None, **options)
            out, _ = tokenize_sft(pc, tokenizer, max_length=None, **options)
            ours = [(r["input_ids"], r["completion_mask"]) for r in out]
            assert_equal_up_to_generation_prompt(tokenizer, ours, theirs, pieces, 1)
        # The tool call is trained, the tool's answer is not.
        ids, mask = tokenize_conversation(tokenizer, conversation, tools=tools)
        text = trained(tokenizer, ids, mask)
        assert '{"name": "add"' in text and "<tool_response>" not in text and "It is 4." in text


def test_ipython_role_matches_trl():
    """Llama 3.1 renders `ipython` (and `tool`) messages; TRL has no training template for it: plain SFT."""
    tokenizer = family_tokenizer("llama3")
    tokenizer.chat_template = (TEMPLATES / "llama3_1.jinja").read_text()
    rows = [
        {"messages": [U("2 + 2?"), A("Let me run it."), {"role": "ipython", "content": "4"}, A("It is 4.")]}
    ]
    theirs = trl_reference(tokenizer, Dataset.from_list(rows), max_length=None)
    out, _ = tokenize_sft(Dataset.from_list(rows), tokenizer, max_length=None)
    assert [(r["input_ids"], r["completion_mask"]) for r in out] == theirs
    ids, mask = tokenize_conversation(tokenizer, rows[0]["messages"])
    assert trained(tokenizer, ids, mask) == "Let me run it.<|eot_id|>It is 4.<|eot_id|>"


def test_template_markers_are_used_when_present():
    """A template with {% generation %} decides the spans itself, even where derivation would differ."""
    tokenizer = embedded.build_tokenizer()  # its markers cover content + <|im_end|>, not the "\n" after it
    conversation = [U("1+1="), A("2"), U("2+2="), A("4")]
    ids, mask = tokenize_conversation(tokenizer, conversation)
    expected = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert (ids, mask) == (expected["input_ids"], expected["assistant_masks"])
    assert trained(tokenizer, ids, mask) == "2<|im_end|>4<|im_end|>"
    unmarked = embedded.build_tokenizer()
    unmarked.chat_template = re.sub(r"\{% (end)?generation %\}", "", embedded.CHAT_TEMPLATE)
    ids2, mask2 = tokenize_conversation(unmarked, conversation)
    assert ids2 == ids
    assert trained(unmarked, ids2, mask2) == "2<|im_end|>\n4<|im_end|>\n"
    batch_ids, batch_masks = tokenize_conversations(unmarked, [conversation, conversation[:2]])
    assert batch_ids[0] == ids2 and batch_masks[0] == mask2 and batch_masks[1] == mask2[: len(batch_ids[1])]


def test_not_prefix_consistent_templates_raise():
    # Qwen3 drops the reasoning of earlier turns: single-turn rows equal TRL's, multi-turn ones are derived from the
    # rendering in context (test_patchable_templates_against_trl); the first turn keeps no think block.
    qwen3 = family_tokenizer("qwen3")
    single = [U("What is 2 + 2?"), A("It is 4.")]
    ids, mask = tokenize_conversation(qwen3, single)
    assert trained(qwen3, ids, mask) == "<think>\n\n</think>\n\nIt is 4.<|im_end|>\n"
    ids, mask = tokenize_conversation(qwen3, CONVERSATIONS[2])
    assert trained(qwen3, ids, mask) == "It is 4.<|im_end|>\n<think>\n\n</think>\n\nHello, fine.<|im_end|>\n"
    # A template that renders a turn differently with each later message (it counts them): each turn is trained as
    # the whole conversation renders it.
    counting = embedded.build_tokenizer()
    chatml = "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{TURN}<|im_end|>\n{%- endfor %}"
    chatml += "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    counting.chat_template = chatml.replace(
        "{TURN}", "{%- if m['role'] == 'assistant' %} of {{ messages|length }}{% endif %}"
    )
    ids, mask = tokenize_conversation(counting, [U("a"), A("b"), U("c"), A("d")])
    assert [counting.decode(ids[s:e]) for s, e in turns(mask)] == ["b of 4<|im_end|>", "d of 4<|im_end|>"]
    # One that writes the next message's content into a turn: the turn's tokens depend on text the model cannot see.
    peeking = embedded.build_tokenizer()
    peeking.chat_template = chatml.replace(
        "{TURN}",
        "{%- if m['role'] == 'assistant' and not loop.last %} (next: {{ messages[loop.index0 + 1]['content'] }}){% endif %}",
    )
    with pytest.raises(
        ValueError,
        match=r"row 0, message 1: the chat template has no \{% generation %\} markers and does not render "
        r"conversations prefix-consistently \(it renders message 1 differently once later messages follow.*"
        r"alone it ends in '<\|im_end\|>', where the whole conversation has ' \(next: c\)<\|im_end\|>",
    ):
        tokenize_conversation(peeking, [U("a"), A("b"), U("c"), A("d")])
    # A template that rewrites earlier turns (numbers them from the end).
    rewriting = embedded.build_tokenizer()
    rewriting.chat_template = (
        "{%- for m in messages %}{{ m['role'] }} {{ messages|length - loop.index0 }}: {{ m['content'] }}\n"
        "{%- endfor %}{%- if add_generation_prompt %}assistant: {%- endif %}"
    )
    with pytest.raises(
        ValueError,
        match=r"row 0, message 1: .* does not render conversations prefix-consistently \(it renders earlier "
        r"messages differently once later ones follow\).*messages 0..0 with the generation prompt end in",
    ):
        tokenize_conversation(rewriting, [U("a"), A("b")])
    with pytest.raises(
        ValueError, match="row 0, message 0: .* the conversation starts with an assistant message"
    ):
        tokenize_conversation(family_tokenizer("llama3"), [A("hello"), U("hi")])


def test_turn_without_end_token_warns():
    """GLM-4 ends a turn with the next message's header: the derived turn has no stop token to train."""
    glm = build_tokenizer(
        [
            "[gMASK]",
            "<sop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
            "<think>",
            "</think>",
        ],
        None,
        "<|user|>",
        (TEMPLATES / "glm4moe.jinja").read_text(),
    )
    conversation = [U("hi"), A("Hello there"), U("and?")]
    with pytest.warns(UserWarning, match=r"rows \[0\]: an assistant turn of the chat template ends on text"):
        ids, mask = tokenize_conversation(glm, conversation)
    assert trained(glm, ids, mask) == "\n<think></think>\nHello there"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_conversation(family_tokenizer("llama3"), conversation)


def test_chat_template_kwargs_reach_the_template():
    """Qwen3 with enable_thinking=False: the generation prompt holds the empty think block, so it is not trained.

    TRL trains it (its training template opens {% generation %} before it): the one difference, by the rule of
    the module docstring.
    """
    qwen3 = family_tokenizer("qwen3")
    rows = [
        {"messages": [U("What is 2 + 2?"), A("It is 4.")], "chat_template_kwargs": {"enable_thinking": False}}
    ]
    theirs = trl_reference(qwen3, Dataset.from_list(rows), max_length=None, assistant_only_loss=True)
    out, _ = tokenize_sft(Dataset.from_list(rows), qwen3, max_length=None, assistant_only_loss=True)
    ids, mask = out[0]["input_ids"], out[0]["completion_mask"]
    assert ids == theirs[0][0]
    assert trained(qwen3, ids, mask) == "It is 4.<|im_end|>\n"
    assert trained(qwen3, *theirs[0]) == "<think>\n\n</think>\n\nIt is 4.<|im_end|>\n"
    direct = tokenize_conversation(
        qwen3, rows[0]["messages"], chat_template_kwargs={"enable_thinking": False}
    )
    assert direct == (ids, mask)
    thinking = tokenize_conversation(qwen3, rows[0]["messages"])  # default: the think block is the model's
    assert trained(qwen3, *thinking) == "<think>\n\n</think>\n\nIt is 4.<|im_end|>\n"
