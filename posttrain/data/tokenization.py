"""Tokenization: prompts, prompt + completion pairs, and whole SFT datasets.

Semantics are TRL 1.16's SFTTrainer dataset preparation (`_prepare_dataset`) followed by its collator's
label masking, expressed as a `completion_mask` (1 where TRL's `labels != -100`):

- standard text (`text`): eos appended when missing; every token is a target.
- standard prompt-completion: eos appended to the completion when missing; `tokenizer(prompt)` and
  `tokenizer(prompt + completion)`; the completion starts where the two token lists diverge (a merge across
  the boundary moves the merged token into the completion, as in TRL).
- conversational `messages`: the chat template; every token is a target, or with `assistant_only_loss`
  only the assistant tokens (`tokenize_conversations`): the template's `{% generation %}` spans when it has
  them, else derived from how the template renders each turn within the whole conversation. input_ids are
  always the model's own template's rendering. TRL instead swaps in its own marked copy of the 31 templates it
  can patch (`get_training_chat_template`); checked against it on each (tests/test_chat_templates.py, single-
  and multi-turn), the masks are equal for cohere, cohere2, diffusion_gemma, gemma, gemma3, idefics3, lfm2,
  lfm2_v2, llama3, phi3, phi3_5, qwen2_5_vl, qwen3_instruct_2507, qwen3_vl and smolvlm, and differ by rule:
  1. what the generation prompt holds is not trained (the model never writes it at inference; TRL trains it):
     qwen2_5 the header's "\n"; deepseekv3, deepseek_r1_distill "<｜Assistant｜>"; gptoss, muse_glimmer
     "<|start|>assistant"; nemotron_3_nano/super/ultra/5_lightning "<think>"; qwen3_8, qwen3_5_think, qwen3_6
     "<think>\n"; qwen3_5_nothink (and qwen3 with enable_thinking=False) "<think>\n\n</think>\n\n".
  2. qwen3, qwen3_5_think, qwen3_5_nothink, qwen3_6 drop an earlier turn's (empty) think block; TRL's copy
     keeps it, so its input_ids differ from the model's. We train each turn as the model's template renders
     it in the conversation (the turn's own tokens; the model's template decides its context).
  3. glm4moe closes no turn (the next header ends it): TRL's copy appends "<|user|>" to the last turn and
     trains each turn's following "<|user|>"; we keep the model's ids, train no stop token, and warn.
  4. llava_next: the space the template writes after "</s>" is trained with the turn; TRL's copy leaves it out.
     (Its messages hold lists of content parts: `tokenize_conversations` takes them, SFT dataset rows do not.)
  Each turn is found in the whole rendering, also where a template renders it differently as the last message
  (see `tokenize_conversations`); a template that writes a later message's text into a turn, or rewrites
  earlier turns with no opener token to place them by, raises, naming the row and message.
- conversational prompt-completion: the template on the prompt with the generation prompt, and on
  prompt + completion; the completion is the suffix. Departure: TRL warns and cuts at the common prefix
  when the first is not a prefix of the second; we raise, because the model would train on a context it
  never sees at inference.
- completion_only_loss (default: True for prompt-completion) keeps only completion tokens as targets;
  both masks apply together when both are on.
- an empty prompt or completion string is a row (TRL trains prompt + eos); see formats.MAY_BE_EMPTY.
- truncation keeps the first `max_length` tokens. A row whose prompt alone fills `max_length` (no target
  survives) is dropped and counted, or raises with overlong_prompt="error" — never truncated into an
  empty completion. TRL drops rows left with no target; the two agree except with
  completion_only_loss=False, where TRL keeps such a row to train on its prompt and we drop it.
"""

from __future__ import annotations

import bisect
import json
import re
import warnings

OVERLONG_PROMPT = ("drop", "error")
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ---------------------------------------------------------------------------------------------------------
# Building blocks (reused by the DPO, reward and GRPO loops)
# ---------------------------------------------------------------------------------------------------------


def is_conversation(value) -> bool:
    """True for a list of message dicts, False for a string."""
    return isinstance(value, list)


def _template_kwargs(tools=None, chat_template_kwargs=None) -> dict:
    tools = json.loads(tools) if isinstance(tools, str) else tools  # TRL accepts tools as a JSON string
    return {"tools": tools or None, **(chat_template_kwargs or {})}


def _prompt_template_flags(prompt: list) -> dict:
    # A prompt that ends on an assistant message is a prefill to continue; otherwise open an assistant turn.
    if prompt[-1]["role"] == "assistant":
        return {"continue_final_message": True}
    return {"add_generation_prompt": True}


def tokenize_prompts(tokenizer, prompts: list, *, tools=None, chat_template_kwargs=None) -> list[list[int]]:
    """Token ids of each prompt, ready for generation (N prompts -> N lists).

    Conversational prompts get the chat template with the generation prompt (or continue a final
    assistant message); strings go through `tokenizer(prompt)` (special tokens such as bos included).
    `tools` / `chat_template_kwargs`: one value for all prompts, passed to the template.
    """
    if not prompts:
        return []
    kwargs = _template_kwargs(tools, chat_template_kwargs)
    if not is_conversation(prompts[0]):
        return tokenizer(list(prompts))["input_ids"]
    out = []
    # One batched call per group of prompts that need the same flags (continue vs generation prompt).
    for flags in ({"add_generation_prompt": True}, {"continue_final_message": True}):
        idx = [i for i, p in enumerate(prompts) if _prompt_template_flags(p) == flags]
        if idx:
            ids = _chat(tokenizer, [prompts[i] for i in idx], idx, **flags, **kwargs)["input_ids"]
            out.extend(zip(idx, ids, strict=True))
    return [ids for _, ids in sorted(out, key=lambda x: x[0])]


def tokenize_prompt(tokenizer, prompt, *, tools=None, chat_template_kwargs=None) -> list[int]:
    """`tokenize_prompts` for one prompt."""
    return tokenize_prompts(tokenizer, [prompt], tools=tools, chat_template_kwargs=chat_template_kwargs)[0]


def tokenize_prompt_completions(
    tokenizer,
    prompts: list,
    completions: list,
    *,
    add_eos: bool = True,
    assistant_masks: bool = False,
    tools=None,
    chat_template_kwargs=None,
    rows=None,
):
    """Tokenize N (prompt, completion) pairs together and split each at the prompt.

    Returns (prompt_ids, completion_ids), N lists each, with prompt_ids + completion_ids the tokenization of
    the whole pair; with assistant_masks=True also N masks over the whole pair (1 on assistant tokens).
    add_eos: append the tokenizer's eos to standard completions that lack it (conversational completions
    end as the template ends them). rows: row indices used in error messages (default 0..N-1).
    Raises when a conversational prompt's tokens are not a prefix of the pair's (the template renders the
    prompt differently alone, so training and inference contexts would differ).
    """
    rows = list(range(len(prompts))) if rows is None else rows
    kwargs = _template_kwargs(tools, chat_template_kwargs)
    conversational = bool(prompts) and is_conversation(prompts[0])
    if conversational:
        # Always the generation prompt, as TRL's SFT (even after a final assistant message, which the
        # template then closes): the completion is a new assistant turn.
        prompt_ids = _chat(tokenizer, prompts, rows, add_generation_prompt=True, **kwargs)["input_ids"]
        pairs = [p + c for p, c in zip(prompts, completions, strict=True)]
        if assistant_masks:
            full_ids, masks = tokenize_conversations(
                tokenizer, pairs, tools=tools, chat_template_kwargs=chat_template_kwargs, rows=rows
            )
        else:
            full_ids = _chat(tokenizer, pairs, rows, **kwargs)["input_ids"]
    else:
        if assistant_masks:
            raise ValueError("assistant_masks needs conversational data (lists of messages)")
        if add_eos:
            completions = [_with_eos(c, tokenizer) for c in completions]
        prompt_ids = tokenizer(list(prompts))["input_ids"]
        full_ids = tokenizer([p + c for p, c in zip(prompts, completions, strict=True)])["input_ids"]

    out_prompt, out_completion = [], []
    for row, p_ids, f_ids in zip(rows, prompt_ids, full_ids, strict=True):
        n = _common_prefix_length(p_ids, f_ids)
        if conversational and n < len(p_ids):
            raise ValueError(
                f"row {row}: the chat template is not prefix-stable: the prompt rendered alone (with the "
                f"generation prompt) ends in {tokenizer.decode(p_ids[n:])!r}, which the prompt + completion "
                f"rendering does not contain at that place (it has {tokenizer.decode(f_ids[n : n + 8])!r})"
            )
        out_prompt.append(f_ids[:n])
        out_completion.append(f_ids[n:])
    if assistant_masks:
        return out_prompt, out_completion, masks
    return out_prompt, out_completion


def tokenize_prompt_completion(
    tokenizer, prompt, completion, *, add_eos: bool = True, tools=None, chat_template_kwargs=None
) -> tuple[list[int], list[int]]:
    """`tokenize_prompt_completions` for one pair: (prompt_ids, completion_ids)."""
    p, c = tokenize_prompt_completions(
        tokenizer,
        [prompt],
        [completion],
        add_eos=add_eos,
        tools=tools,
        chat_template_kwargs=chat_template_kwargs,
    )
    return p[0], c[0]


def _chat(tokenizer, conversations: list, rows=None, **kwargs):
    """One batched `apply_chat_template` call: a BatchEncoding with lists of ids (and masks).

    A conversation the template refuses (its `raise_exception`) raises ValueError naming its row (rows: the
    conversations' row indices, default 0..N-1).
    """
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, **kwargs)
    except TemplateError:
        rows = range(len(conversations)) if rows is None else rows
        for row, conversation in zip(rows, conversations, strict=True):
            _render(tokenizer, conversation, row, tokenize=True, return_dict=True, **kwargs)
        raise


def _render(tokenizer, messages: list, row, **kwargs):
    """`apply_chat_template` of one conversation (text, or ids with tokenize=True), its row named on error."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, **{"tokenize": False, **kwargs})
    except TemplateError as e:
        raise ValueError(f"row {row}: the chat template cannot render this conversation: {e}") from None


def _with_eos(text: str, tokenizer) -> str:
    eos = tokenizer.eos_token
    if eos is None:
        raise ValueError("the tokenizer has no eos_token, which standard (string) completions get appended")
    return text if text.endswith(eos) else text + eos


def _common_prefix_length(a, b) -> int:
    """Length of the longest common prefix of two sequences (lists or strings): a binary search over slice
    comparisons, which run in C, instead of a Python loop over elements."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ---------------------------------------------------------------------------------------------------------
# Assistant masks (SFT's assistant_only_loss; conversational chosen / rejected and multi-turn prompts)
# ---------------------------------------------------------------------------------------------------------


def tokenize_conversation(tokenizer, messages: list, *, tools=None, chat_template_kwargs=None):
    """(input_ids, assistant_mask) of one conversation: T ints each, mask 1 on the tokens of assistant turns.

    `tokenize_conversations` for one conversation (see there for the rules and errors).
    """
    ids, masks = tokenize_conversations(
        tokenizer, [messages], tools=tools, chat_template_kwargs=chat_template_kwargs
    )
    return ids[0], masks[0]


def tokenize_conversations(
    tokenizer, conversations: list, *, tools=None, chat_template_kwargs=None, rows=None
):
    """Token ids and assistant masks of N conversations (N lists of T_i ints each).

    input_ids are the model's own chat template's rendering of each whole conversation, tokenized as
    `apply_chat_template` does (never another template's: the ids are what the model is trained on). The mask
    is 1 on every token that overlaps an assistant turn's span of that text (the overlap rule of
    transformers' `return_assistant_tokens_mask`):
    - a template with `{% generation %}` markers: the spans it marks;
    - any other template, derived: assistant turn k is the text of the whole rendering from where it leaves
      the generation prompt (rendering messages[:k] with it) to the end of the turn's closing. So what the
      generation prompt holds (the header "<|im_start|>assistant\\n", an opened "<think>\\n") is not trained —
      at inference the model never writes it — while the content and the end-of-turn token ("<|im_end|>\\n",
      "<|eot_id|>", "<end_of_turn>\\n", gpt-oss's "<|end|>" mid-conversation and "<|return|>" last) are, and
      a closing that the template puts after every conversation (Phi-3's eos) only on a final turn.
      The end of a turn is where rendering messages[:k + 1] stops agreeing with the whole rendering. Templates
      whose rendering of a turn depends on what follows it (Qwen3 keeps the reasoning of a turn only while no
      user message follows; gpt-oss ends the last turn with "<|return|>", others with "<|end|>") are asked
      again with the whole conversation, a neighbour's content replaced by a sentinel, and the message
      boundaries are placed at the generation prompt's first token ("<|im_start|>", "<|start|>"): the turn
      ends where the next message opens, and starts after the generation prompt put where the turn opens.
    Cost: one batched render of the conversations, one of each assistant turn's prompt and one of each
    non-final turn's prefix, so renders grow quadratically with the turns (each prefix is rendered anew);
    templates of the previous paragraph add one render of the whole conversation per turn (neighbouring turns
    share it). Measured on 8-turn rows against a plain batched `apply_chat_template`: Llama 3 4-5x (7x before
    this batching and caching), gpt-oss about 7x, Qwen3.6 about 11x (both raised before).
    The derivation raises, naming the row, the message and what differs, for a template that rewrites
    earlier turns with no opener token to place them by, that writes a later message's text into a turn, or
    whose generation prompt holds text that a rendered turn does not start with, and for a conversation that
    starts with an assistant message. A derived turn that ends on text rather than an end-of-turn token
    (GLM-4, whose next header ends a turn) gives a warning: the model would never be trained to stop.
    rows: row indices used in error messages (default 0..N-1).
    """
    rows = list(range(len(conversations))) if rows is None else rows
    kwargs = _template_kwargs(tools, chat_template_kwargs)
    if has_generation_markers(tokenizer):
        enc = _chat(tokenizer, conversations, rows, return_assistant_tokens_mask=True, **kwargs)
        return enc["input_ids"], enc["assistant_masks"]
    turns = [
        (i, k) for i, msgs in enumerate(conversations) for k, m in enumerate(msgs) if m["role"] == "assistant"
    ]
    for i, k in turns:
        if k == 0:
            raise ValueError(
                f"row {rows[i]}, message 0: the chat template has no {{% generation %}} markers and the "
                "conversation starts with an assistant message, so no prompt separates the turn from the "
                "template's header; add generation markers to the template or a first user message"
            )
    # Every text the derivation needs, each in one batched call (a call costs more than a render).
    texts = _render_all(tokenizer, conversations, rows, kwargs)
    prompts = _render_all(
        tokenizer, [conversations[i][:k] for i, k in turns], [rows[i] for i, _ in turns], kwargs, True
    )
    # The prefix ending on a conversation's last message is the conversation's text: not rendered again.
    inner = [(i, k) for i, k in turns if k + 1 < len(conversations[i])]
    prefixes = _render_all(
        tokenizer, [conversations[i][: k + 1] for i, k in inner], [rows[i] for i, _ in inner], kwargs
    )
    prefix_of = dict(zip(inner, prefixes, strict=True))
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {}
    ctx = _Derivation(tokenizer, kwargs)
    spans = [[] for _ in conversations]
    for (i, k), prompt in zip(turns, prompts, strict=True):
        spans[i].append(
            ctx.span(
                conversations[i],
                k,
                texts[i],
                enc["offset_mapping"][i],
                prompt,
                prefix_of.get((i, k)),
                rows[i],
            )
        )
    ids, masks, unstopped = [], [], []
    for i, row in enumerate(rows):
        ids.append(enc["input_ids"][i])
        masks.append(_mask_from_spans(enc["offset_mapping"][i], spans[i]))
        if not ctx.turns_end_on_special_tokens(ids[-1], masks[-1]):
            unstopped.append(row)
    if unstopped:
        # GLM-4 style: the next message's header ends a turn, so the turn's own rendering has no stop token.
        warnings.warn(
            f"rows {unstopped[:5]}: an assistant turn of the chat template ends on text, not on an end-of-turn "
            "token, so assistant_only_loss never trains the model to stop; use a template whose turns end "
            "with one, or one with {% generation %} markers that include it",
            stacklevel=2,
        )
    return ids, masks


def _render_all(tokenizer, conversations, rows, kwargs, add_generation_prompt=False) -> list[str]:
    """The texts of N conversations in one `apply_chat_template` call; an error names the first failing row."""
    from jinja2 import TemplateError

    if not conversations:
        return []
    try:
        return tokenizer.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except TemplateError:
        for row, messages in zip(rows, conversations, strict=True):
            _render(tokenizer, messages, row, add_generation_prompt=add_generation_prompt, **kwargs)
        raise


_SENTINEL = "Zq7sentinelXv"  # stands in for the next message's content: plain text no template rewrites


class _Derivation:
    """What one `tokenize_conversations` call computes once for the template: its added tokens, and (on
    first need) the token that opens a message."""

    def __init__(self, tokenizer, kwargs):
        self.tokenizer, self.kwargs = tokenizer, kwargs
        added = tokenizer.get_added_vocab()
        self.added_ids = set(added.values())
        pieces = "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))
        self.markup = re.compile(rf"(?:{pieces}|\s)*" if pieces else r"\s*")
        self._opener = None
        self._sentinel_renders = {}
        self._one_message = None

    def render(self, messages, row, **kw) -> str:
        return _render(self.tokenizer, messages, row, **kw, **self.kwargs)

    def probe(self, messages, row, **kw) -> str:
        """`render` of a conversation made up for the derivation: "" where the template refuses it, so that the
        derivation's own error (naming what differs) is the one raised."""
        try:
            return self.render(messages, row, **kw)
        except ValueError:
            return ""

    def with_sentinel(self, messages, j, row) -> str:
        """`probe` of the whole conversation with message j's content replaced by the sentinel, once per (row, j):
        turn j - 1's end and turn j + 1's start ask for the same one."""
        key = (id(messages), j)
        if key not in self._sentinel_renders:
            changed = [*messages[:j], {**messages[j], "content": _SENTINEL}, *messages[j + 1 :]]
            self._sentinel_renders[key] = self.probe(changed, row)
        return self._sentinel_renders[key]

    def one_message(self, row) -> tuple[str, str]:
        """The rendering of a one-user-message conversation, without and with the generation prompt (once)."""
        if self._one_message is None:
            probe = [{"role": "user", "content": _SENTINEL}]
            self._one_message = self.probe(probe, row), self.probe(probe, row, add_generation_prompt=True)
        return self._one_message

    def opener(self, row) -> str | None:
        """The generation prompt's first token when it is an added token ("<|im_start|>", "<|start|>"): the
        token that opens every message of such templates; None otherwise."""
        if self._opener is None:
            bare, with_prompt = self.one_message(row)
            self.generation_prompt = with_prompt[_common_prefix_length(bare, with_prompt) :]
            first = self.tokenizer(
                self.generation_prompt, add_special_tokens=False, return_offsets_mapping=True
            )
            ok = bare and first["input_ids"] and first["input_ids"][0] in self.added_ids
            self._opener = self.generation_prompt[slice(*first["offset_mapping"][0])] if ok else ""
        return self._opener or None

    def prompt_in_context(self, messages, k, text, row) -> str | None:
        """`text` up to where assistant message k opens, plus the generation prompt; None if not found.

        Where it opens: the first opener after message k - 1's content, found by rendering the whole
        conversation with that content replaced by a sentinel; what follows must then be `text`'s own end.
        """
        opener = self.opener(row)
        if opener is None:
            return None
        before = self.with_sentinel(messages, k - 1, row)
        sentinel = before.find(_SENTINEL)
        at = before.find(opener, sentinel) if sentinel >= 0 else -1
        if at < 0 or not text.endswith(before[at:]):
            return None
        return text[: len(text) - len(before) + at] + self.generation_prompt

    def span(self, messages, k, text, offsets, prompt, prefix, row) -> tuple[int, int]:
        """Character span [start, end) of assistant message k in `text`, the rendering of all `messages`.

        prompt: the rendering of messages[:k] with the generation prompt; prefix: of messages[:k + 1]
        (None when message k is the last one, whose prefix is `text`).
        """
        boundaries = [0] + [end for _, end in offsets]
        # Cut at the last token boundary at or before i, so a span never starts or ends inside a token that the
        # two renderings only partly share ("<|" of "<|user|>" and of "<|endoftext|>").
        snap = lambda i: boundaries[bisect.bisect_right(boundaries, i) - 1]
        where = f"row {row}, message {k}: the chat template has no {{% generation %}} markers and"
        # Start: where the turn leaves the generation prompt. A generation prompt may go on past how a rendered
        # turn starts (an opened think block, "<think>\n"); that rest must be markup, not text.
        start = snap(_common_prefix_length(prompt, text))
        if not self.markup.fullmatch(prompt, start):
            # Qwen3 renders an earlier turn's reasoning only while no user message follows it, so messages[:k]
            # alone may render it differently from the whole conversation: put the generation prompt where
            # turn k opens in the whole rendering instead.
            prompt = self.prompt_in_context(messages, k, text, row) or prompt
            start = snap(_common_prefix_length(prompt, text))
        if not self.markup.fullmatch(prompt, start):
            raise ValueError(
                f"{where} does not render conversations prefix-consistently (it renders earlier messages "
                f"differently once later ones follow), so assistant turns cannot be found: messages "
                f"0..{k - 1} with the generation prompt end in {prompt[start:][:60]!r}, where the whole "
                f"conversation has {text[start:][:60]!r}; add generation markers to the template"
            )
        if prefix is None:
            return start, len(text)
        # End: where the turn rendered last stops agreeing with the whole conversation.
        end = _common_prefix_length(prefix, text)
        if end == len(prefix):
            return start, end
        end = snap(end)
        tail = prefix[end:]
        # The whole conversation with the next message's content replaced by a sentinel: what decides the turn's
        # rendering (Qwen3: is a user message still to come?) is as in `text`, and the sentinel shows where the
        # next message's own text begins.
        after = self.with_sentinel(messages, k + 1, row)
        sentinel = after.find(_SENTINEL, start)
        # What the prefix has beyond `end` may be a closing the template puts after every conversation (Phi-3's
        # eos): a one-message conversation ends with it too, and the whole conversation goes on from `end` with
        # markup only (the next message's header).
        if (
            end >= start
            and self.markup.fullmatch(tail)
            and text.endswith(tail)
            and self.one_message(row)[0].endswith(tail)
            and after[:end] == text[:end]
            and sentinel >= end
            and self.markup.fullmatch(after, end, sentinel)
        ):
            return start, end
        # Or the template renders a last turn differently (gpt-oss's "<|return|>"): the turn ends where the next
        # message opens.
        opener = self.opener(row)
        if opener is not None and sentinel >= 0:
            opens = after.rfind(opener, start, sentinel)
            if opens > start and snap(opens) == opens and after[:opens] == text[:opens]:
                return start, opens
        raise ValueError(
            f"{where} does not render conversations prefix-consistently (it renders message {k} "
            f"differently once later messages follow, e.g. rewriting its content), so its tokens cannot be "
            f"found: alone it ends in {tail[:60]!r}, where the whole conversation has {text[end:][:60]!r}; "
            "add generation markers to the template"
        )

    def turns_end_on_special_tokens(self, ids, mask) -> bool:
        """Whether each run of 1s in `mask` ends, whitespace aside, on an added token (TRL's stop-token check)."""
        decode = self.tokenizer.decode
        ends = [t for t in range(len(mask)) if mask[t] and (t + 1 == len(mask) or not mask[t + 1])]
        for end in ends:
            t = end
            while t > 0 and mask[t - 1] and not decode([ids[t]]).strip():
                t -= 1
            if ids[t] not in self.added_ids and decode([ids[t]]).strip():
                return False
        return True


def _mask_from_spans(offsets, spans) -> list[int]:
    """1 on each token whose characters overlap one of the sorted spans (transformers' rule)."""
    mask = [0] * len(offsets)
    s = 0
    for t, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:
            mask[t] = 1
    return mask


def has_generation_markers(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks assistant turns with `{% generation %}`."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(template) and _GENERATION_MARKER.search(template) is not None


# ---------------------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------------------


def tokenize_sft(
    dataset,
    tokenizer,
    *,
    max_length: int | None = 1024,
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    overlong_prompt: str = "drop",
    dataset_text_field: str = "text",
):
    """Tokenize a language-modelling or prompt-completion dataset for SFT, as TRL 1.16 does.

    Returns (dataset with columns input_ids, completion_mask — lists of T_i ints —, info) where info is
    {"dropped_overlong_prompts": int, "truncated": int}. completion_mask is 1 on the tokens whose loss TRL
    counts (its `labels != -100`, before the shift); the collators zero each sequence's first token.
    max_length=None: no truncation. Other columns (and `tools` / `chat_template_kwargs` after use) are
    dropped. See the module docstring for the rules.
    """
    from .formats import check_format, validate_rows

    if overlong_prompt not in OVERLONG_PROMPT:
        raise ValueError(f"overlong_prompt must be one of {OVERLONG_PROMPT}, got {overlong_prompt!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    fmt = check_format(
        dataset, ("language_modeling", "prompt_completion"), "sft", text_field=dataset_text_field
    )
    if fmt.conversational and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the dataset is conversational (field {fmt.columns[0]!r} holds message lists) but the tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no chat template "
            "(tokenizer.chat_template is None): use a model_name_or_path whose tokenizer has one, set "
            "tokenizer.chat_template, or use a dataset of plain strings"
        )
    if assistant_only_loss and not fmt.conversational:
        raise ValueError(
            "assistant_only_loss=True needs a conversational dataset (messages, or prompt/completion as "
            "message lists); this one holds strings"
        )
    if completion_only_loss and fmt.kind == "language_modeling":
        raise ValueError(
            "completion_only_loss=True needs a prompt-completion dataset; this one is language modelling "
            "(use assistant_only_loss for conversations)"
        )
    validate_rows(dataset, fmt)
    completion_only = (
        fmt.kind == "prompt_completion" if completion_only_loss is None else completion_only_loss
    )

    def tokenize_batch(batch, indices):
        if fmt.kind == "prompt_completion":
            prompt_ids, completion_ids, masks = _tokenize_pc_batch(
                tokenizer, batch, indices, assistant_only_loss, completion_only
            )
            ids = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
            prompt_lens = [len(p) for p in prompt_ids]
        else:
            ids, masks = _tokenize_lm_batch(tokenizer, batch, indices, fmt, assistant_only_loss)
            prompt_lens = [0] * len(ids)
        out = {"input_ids": [], "completion_mask": [], "truncated": []}
        for row, row_ids, mask, prompt_len in zip(indices, ids, masks, prompt_lens, strict=True):
            if 1 not in mask:
                what = "assistant tokens" if assistant_only_loss else "completion tokens"
                raise ValueError(f"row {row}: no {what} to train on after tokenization")
            if max_length is not None and (prompt_len >= max_length or 1 not in mask[:max_length]):
                if overlong_prompt == "error":
                    raise ValueError(
                        f"row {row}: the prompt has {max(prompt_len, mask.index(1))} tokens, so max_length="
                        f"{max_length} leaves no completion token; raise max_length, shorten the prompt, or "
                        "pass overlong_prompt='drop'"
                    )
                continue  # dropped: counted from the row count
            cut = len(row_ids) if max_length is None else max_length
            out["input_ids"].append(row_ids[:cut])
            out["completion_mask"].append(mask[:cut])
            out["truncated"].append(len(row_ids) > cut)
        return out

    tokenized = dataset.map(
        tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        desc="Tokenizing (SFT)",
    )
    if len(tokenized) == 0:
        raise ValueError(
            f"every row's prompt fills max_length={max_length} tokens: nothing is left to train on"
        )
    info = {
        "dropped_overlong_prompts": len(dataset) - len(tokenized),
        "truncated": int(tokenized.with_format("arrow")["truncated"].to_numpy().sum()),
    }
    return tokenized.remove_columns("truncated"), info


def _row_template_kwargs(batch, i: int) -> dict:
    """Per-row `tools` and `chat_template_kwargs` columns (TRL reads both)."""
    return {
        "tools": batch["tools"][i] if "tools" in batch else None,
        "chat_template_kwargs": batch["chat_template_kwargs"][i] if "chat_template_kwargs" in batch else None,
    }


def template_kwargs_groups(batch, n: int):
    """A batch's rows in groups that share template kwargs, as (row indices, kwargs) pairs: one group unless
    per-row tools / chat_template_kwargs columns exist (then one row each)."""
    if "tools" not in batch and "chat_template_kwargs" not in batch:
        return [(list(range(n)), {})]
    return [([i], _row_template_kwargs(batch, i)) for i in range(n)]


def _tokenize_pc_batch(tokenizer, batch, indices, assistant_only_loss, completion_only):
    n = len(indices)
    prompt_ids, completion_ids, masks = [None] * n, [None] * n, [None] * n
    for group, kwargs in template_kwargs_groups(batch, n):
        result = tokenize_prompt_completions(
            tokenizer,
            [batch["prompt"][i] for i in group],
            [batch["completion"][i] for i in group],
            assistant_masks=assistant_only_loss,
            rows=[indices[i] for i in group],
            **kwargs,
        )
        for j, i in enumerate(group):
            p, c = result[0][j], result[1][j]
            prompt_ids[i], completion_ids[i] = p, c
            mask = [0] * len(p) + [1] * len(c) if completion_only else [1] * (len(p) + len(c))
            if assistant_only_loss:
                mask = [m & a for m, a in zip(mask, result[2][j], strict=True)]
            masks[i] = mask
    return prompt_ids, completion_ids, masks


def _tokenize_lm_batch(tokenizer, batch, indices, fmt, assistant_only_loss):
    n = len(next(iter(batch.values())))
    if not fmt.conversational:
        ids = tokenizer([_with_eos(t, tokenizer) for t in batch[fmt.text_field]])["input_ids"]
        return ids, [[1] * len(x) for x in ids]
    ids, masks = [None] * n, [None] * n
    for group, kwargs in template_kwargs_groups(batch, n):
        conversations = [batch["messages"][i] for i in group]
        if assistant_only_loss:
            group_ids, group_masks = tokenize_conversations(
                tokenizer, conversations, rows=[indices[i] for i in group], **kwargs
            )
        else:
            rows = [indices[i] for i in group]
            group_ids = _chat(tokenizer, conversations, rows, **_template_kwargs(**kwargs))["input_ids"]
            group_masks = [[1] * len(x) for x in group_ids]
        for j, i in enumerate(group):
            ids[i], masks[i] = group_ids[j], group_masks[j]
    return ids, masks
