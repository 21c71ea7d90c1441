"""(model, batch) -> per-token log-probs: the one place every loop gets log p(token) from.

Notation: B batch, T time, H hidden, V vocab, N = number of target tokens in the batch.

Only the positions whose log-prob a loss needs (the batch's `completion_mask`) go through the
output layer. For the model families listed in `FUSED_MODEL_TYPES` the logits are never built: the
final hidden states are captured at the input of the output embedding and fed, with its weight, to
`kernels.logprobs_from_hidden`. Any other model gets its full logits from its own forward and
`kernels.logprobs_from_logits`.

Rows that begin with the same prompt (GRPO's and RLOO's G completions of a prompt, Online DPO's pairs, DPO's
and CPO's chosen and rejected) run it once when the loop asks (`share_prompts`, `shared_prefix`): the
prompt's forward into a KV cache that each of its rows reads, then the rows' completions. On the GRPO
benchmark's step (a 64-token prompt, 8 completions of 32) that takes the body's tokens from 768 to 320.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from posttrain.kernels import logprobs_from_hidden, logprobs_from_logits
from posttrain.rl import lean, lora, stock
from posttrain.rl.distributed import is_sharded, release_frozen_root, unwrap
from posttrain.rl.rollout import cache_kwarg

# Families whose forward is `lm_head(final_norm(decoder(x)))`, followed at most by the soft-capping
# and logit scale read from the config below. Others (or unknown post-processing) take the logits path.
FUSED_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "qwen2_moe",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo2",
        "smollm3",
    }
)


class TokenLogProbs(NamedTuple):
    """Per-token outputs, each (B, T), aligned to tokens: entry t is about input_ids[:, t] given the
    tokens before it; 0 (False) wherever the mask is 0. All but `logps` are None unless asked; their
    definitions are in `posttrain.kernels` (mean_logit and log_sum_sq carry no gradient)."""

    logps: torch.Tensor
    entropy: torch.Tensor | None
    is_top1: torch.Tensor | None
    mean_logit: torch.Tensor | None
    log_sum_sq: torch.Tensor | None
    aux_loss: torch.Tensor | None = None  # 0-dim: a mixture-of-experts model's router load-balancing loss


def supports_fused(model: torch.nn.Module) -> bool:
    """The fused path applies: a listed family whose output layer is a plain one. Through a peft model the
    output layer is found on the model it wraps; one that carries an adapter or is trained in full as a
    module to save computes more than `weight @ hidden`, so it takes the logits path."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in FUSED_MODEL_TYPES:
        return False
    head = inner.get_output_embeddings()
    return head is not None and not lora.is_adapter_layer(head)


@contextlib.contextmanager
def _capture_output_layer_input(model: torch.nn.Module):
    """Run the model's own forward (through any DDP wrapper, so gradient sync still works) while its
    output layer sees zero rows: the hidden states it would have projected are captured instead."""
    captured = {}

    def pre_hook(module, args):
        (hidden,) = args
        captured["hidden"] = hidden
        return (hidden[..., :0, :],)

    handle = unwrap(model).get_output_embeddings().register_forward_pre_hook(pre_hook)
    try:
        yield captured
    finally:
        handle.remove()


def _model_inputs(batch: dict) -> dict:
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    for key in ("attention_mask", "position_ids"):
        if batch.get(key) is not None:
            inputs[key] = batch[key]
    return inputs


def token_logprobs(
    model: torch.nn.Module,
    batch: dict,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_top1: bool = False,
    return_mean_logit: bool = False,
    return_log_sum_sq: bool = False,
    return_router_aux_loss: bool = False,
    mask: torch.Tensor | None = None,
    share_prompts: bool = False,
) -> TokenLogProbs:
    """log p(input_ids[b, t] | input_ids[b, <t]) at every target token.

    batch: input_ids (B, T), completion_mask (B, T) [, attention_mask (B, T), position_ids (B, T)].
    mask: (B, T) overrides `batch["completion_mask"]` as the set of target tokens. Token 0 of a row is
    never a target (nothing predicts it); the collators already zero the mask at every sequence start.
    share_prompts: rows that begin with the same prompt (a prompt's sampled completions, a pair's chosen and
    rejected) run it once where `shared_prefix` finds such rows (the fused families only).
    Returns TokenLogProbs of (B, T) float32 tensors; with return_router_aux_loss, also the model's own
    router load-balancing loss (mixture-of-experts models; its forward computes it over the attention mask).
    """
    input_ids = batch["input_ids"]
    mask = batch["completion_mask"] if mask is None else mask
    B, T = input_ids.shape
    # Position t predicts token t + 1: the target rows are the flat positions b * T + t whose next token is
    # in the mask. nonzero is the one host sync: N, the number of targets, sizes the output layer's matmuls.
    b, t = mask[:, 1:].nonzero(as_tuple=True)
    rows = b * T + t  # (N,) into the flattened (B * T,) positions
    index = input_ids.reshape(-1).index_select(0, rows + 1)  # (N,) the target tokens
    wanted = dict(
        return_entropy=return_entropy,
        return_top1=return_top1,
        return_mean_logit=return_mean_logit,
        return_log_sum_sq=return_log_sum_sq,
    )
    flags = dict(temperature=temperature, **wanted)
    inputs = _model_inputs(batch)
    if return_router_aux_loss:
        inputs["output_router_logits"] = True

    if supports_fused(model):
        inner = unwrap(model)
        share = share_prompts and not return_router_aux_loss  # two forwards would give two router losses
        shared = shared_prefix(inner, batch, mask) if share else None
        head = inner.get_output_embeddings()
        tie = TiedWeight(head.weight) if _ties(model, inner) else None
        with (
            _capture_output_layer_input(model) as captured,
            lean.layers(model),
            _tied_lookups(inner, tie),
        ):
            if shared is None:
                aux_loss = _router_aux_loss(model(**inputs), return_router_aux_loss)
                hidden = captured["hidden"]
                hidden = hidden.reshape(B * T, hidden.shape[-1]).index_select(0, rows)  # (N, H)
            else:
                aux_loss, hidden = None, _shared_prefix_hidden(model, batch, shared, captured, b, t)
        config = inner.config
        out = logprobs_from_hidden(
            hidden,
            _gathered_weight(head) if tie is None else tie.weight,
            index,
            bias=head.bias,
            logit_scale=getattr(config, "logit_scale", None) or 1.0,
            softcap=getattr(config, "final_logit_softcapping", None),
            **flags,
        )
    else:
        with lean.layers(model):
            output = model(**inputs)
        aux_loss, logits = _router_aux_loss(output, return_router_aux_loss), output.logits  # logits (B, T, V)
        del output  # so that the (B, T, V) logits are freed once the target rows are copied out
        # The row selection copies the target rows, and nothing reads that copy again: its buffer can take
        # dlogits, saving an (N, V) tensor in backward.
        logits = logits.reshape(B * T, logits.shape[-1]).index_select(0, rows)  # (N, V)
        out = logprobs_from_logits(logits, index, inplace_backward=True, **flags)

    release_frozen_root(model)  # a sharded reference's output layer is not needed until its next forward
    # the kernels return logps followed by the wanted outputs in TokenLogProbs' order: deal them back out
    outs = iter(out if isinstance(out, tuple) else (out,))
    place = functools.partial(_place, positions=rows + 1, shape=(B, T))
    logps = place(next(outs))
    optional = [place(next(outs)) if want else None for want in wanted.values()]
    return TokenLogProbs(logps, *optional, aux_loss)


def shared_prefix(model: torch.nn.Module, batch: dict, mask: torch.Tensor) -> SharedPrefix | None:
    """Where rows of `batch` begin with the same P columns before their first target (a prompt's G sampled
    completions; DPO's chosen and rejected), the decoder can run that prefix once per distinct prefix and the
    rest of each row on its cached keys and values: the same hidden states to float32 rounding, for the
    prefix's share of the body's work (G - 1 of every G prompt forwards). None where nothing is shared or the
    model cannot take the split forward:
      - a batch without attention_mask (packed and padding-free rows tell their documents apart by position
        alone, which a cached prefix would not see);
      - gradient checkpointing (transformers drops the cache under it), FSDP2-sharded weights;
      - a cache with anything but plain full-attention layers (a sliding-window layer keeps only its window),
        dynamic or long-rope rotary scaling, a mixture of experts set to return its router logits.
    P is the first column any row's first target is at (position P - 1 predicts it), so a row's targets all
    lie after the prefix. One host sync for P, one for the distinct prefixes."""
    attention_mask = batch.get("attention_mask")
    if attention_mask is None or mask.shape[0] < 2 or not _takes_split_forward(model):
        return None
    columns = mask[:, 1:].any(0).nonzero()
    if len(columns) == 0 or int(columns[0]) == 0:
        return None
    P = int(columns[0]) + 1
    key = [batch["input_ids"][:, :P], attention_mask[:, :P].to(batch["input_ids"].dtype)]
    if batch.get("position_ids") is not None:
        key.append(batch["position_ids"][:, :P].to(batch["input_ids"].dtype))
    unique, inverse = torch.unique(torch.cat(key, 1), dim=0, return_inverse=True)
    if len(unique) == mask.shape[0]:
        return None
    rows = torch.arange(len(inverse), device=inverse.device)
    first = rows.new_full((len(unique),), len(inverse)).scatter_reduce_(0, inverse, rows, "amin")
    return SharedPrefix(P, first, inverse)


class SharedPrefix(NamedTuple):
    """P columns shared; first (u,): a row holding each distinct prefix; inverse (B,): each row's prefix."""

    P: int
    first: torch.Tensor
    inverse: torch.Tensor


def _takes_split_forward(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through peft
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    # a decoder compiled in place (torch_compile) takes the split too: the prefix and the rest calls are two
    # graphs, cache and all, then reused with their sizes dynamic
    if stock.checkpointing(base) or decoder is None:
        return False
    if hasattr(model.get_input_embeddings().weight, "placements"):
        return False
    # rotary angles that rescale with the longest position of the call would differ between the two calls
    if stock.rescaled_rope(getattr(decoder, "rotary_emb", None)):
        return False
    # a mixture of experts that returns its router logits sums its load-balancing loss over the (B, T)
    # attention mask, which the second call's (B, T - P) tokens would not match
    if getattr(model.config, "output_router_logits", False):
        return False
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def _shared_prefix_hidden(model, batch: dict, shared: SharedPrefix, captured: dict, b, t) -> torch.Tensor:
    """The final hidden states (N, H) at the target positions (b, t), from a forward of each distinct prefix
    (u, P) into a cache, whose keys and values every row then reads (index_select: the backward sums the
    rows' gradients into their prefix), and a forward of the rows' remaining T - P columns on it. The prefix
    runs through the model inside any DDP wrapper, the rest through the wrapper: each weight's gradient is
    still accumulated once, when both have given theirs."""
    P, first, inverse = shared
    inner = unwrap(model)
    input_ids = batch["input_ids"]
    B, T = input_ids.shape
    position_ids = batch.get("position_ids")
    prefix_ids, rest_ids = input_ids[first, :P], input_ids[:, P:]
    # One embedding lookup for both calls: a trained embedding's backward builds a dense (V, H) gradient per
    # call (a tied one's then added into the output layer's), so two calls would build and add two.
    if not _own_lookup(inner):
        prefix_inputs, rest_inputs = {"input_ids": prefix_ids}, {"input_ids": rest_ids}
    else:
        embeds = inner.get_input_embeddings()(torch.cat([prefix_ids.reshape(-1), rest_ids.reshape(-1)]))
        prefix_embeds, rest_embeds = embeds.split([prefix_ids.numel(), rest_ids.numel()])
        prefix_inputs = {"inputs_embeds": prefix_embeds.view(*prefix_ids.shape, -1)}
        rest_inputs = {"inputs_embeds": rest_embeds.view(*rest_ids.shape, -1)}
    cache = DynamicCache(config=inner.config)
    inner(
        **prefix_inputs,
        attention_mask=batch["attention_mask"][first, :P],
        position_ids=None if position_ids is None else position_ids[first, :P],
        use_cache=True,
        **cache_kwarg(inner, cache),
    )
    last = captured["hidden"][:, -1]  # (u, H)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, inverse), layer.values.index_select(0, inverse)
    model(
        **rest_inputs,
        attention_mask=batch["attention_mask"],
        position_ids=None if position_ids is None else position_ids[:, P:],
        use_cache=True,
        **cache_kwarg(inner, cache),
    )
    # positions P - 1 (the prefix's last), P, ..., T - 1: (B, 1 + T - P, H)
    hidden = torch.cat([last.index_select(0, inverse)[:, None], captured["hidden"]], 1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, b * (T - P + 1) + t - (P - 1))


class TiedWeight:
    """An embedding tied to the fused output layer, for one forward: the lookup's gradient is added into the
    output layer's at the looked-up rows.

    Plainly, autograd gives the tied weight two gradients: the output layer's dense (V, H) one, and the
    lookup's, which the embedding's backward builds as a zeroed (V, H) tensor with the ids' rows summed in, to
    be added to the first (benchmarks/dpo.py's model: 31 MiB zeroed and added, 1-2 % of a DPO or SFT step).
    Here the output layer and the lookup (`_tied_lookups`) both read `weight`, an alias of the parameter whose
    backward runs once both have given theirs: the lookup's backward keeps the rows of its u distinct ids (u, H),
    summed by the embedding's own backward op in its order (a padding id's left at zero), and the alias's
    backward adds them into the output layer's gradient in place. The same values (tests/test_tied_embedding.py;
    only a -0.0 at a row no id looked up, which the dense sum would turn into +0.0, stays -0.0).

    `applies(model)`: autograd records, and the embedding is a plain `nn.Embedding` (no max_norm, nothing
    attached) whose trained weight is the output layer's (`token_logprobs` also leaves compiled models out). The
    output layer's backward must hand the alias a gradient nobody else holds (the fused kernel's dweight is
    fresh, or its kept-logits buffer, released by then)."""

    def __init__(self, weight: torch.nn.Parameter):
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids (u,), rows (u, H)) from each lookup
        self.weight = _TieJoin.apply(weight, self.rows)  # (V, H)

    @staticmethod
    def applies(model: torch.nn.Module) -> bool:
        module, head = model.get_input_embeddings(), model.get_output_embeddings()
        return (
            torch.is_grad_enabled()
            and type(module) is torch.nn.Embedding
            and head is not None
            and module.weight is head.weight
            and module.weight.requires_grad
            and module.weight.layout == torch.strided
            and module.max_norm is None
            and not module.scale_grad_by_freq
            and not module.sparse
            and not stock.intercepted(module)
            and not stock.backward_hooked(module)
        )

    def embed(self, ids: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        """ids (...) -> (..., H)."""
        return _TiedLookup.apply(ids, self.weight, padding_idx, self.rows)


class _TieJoin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, rows):
        ctx.rows = rows  # the list, not the TiedWeight: no reference cycle through the graph
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        # `grad` is the output layer's fresh dense gradient, held by nobody else: the rows go in in place
        for ids, rows in ctx.rows:
            grad.index_add_(0, ids, rows)
        ctx.rows.clear()
        return grad, None


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, rows):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.rows = padding_idx, rows
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        ids = ids.reshape(-1)
        unique, inverse = torch.unique(ids, return_inverse=True)  # (u,), (n,)
        u = len(unique)
        if ctx.padding_idx is not None:  # a padding id's rows go to an extra row u, which the op leaves at 0
            inverse = inverse.masked_fill(ids == ctx.padding_idx, u)
        rows = torch.ops.aten.embedding_dense_backward(grad.reshape(len(ids), -1), inverse, u + 1, u, False)
        ctx.rows.append((unique, rows[:u]))
        return None, None, None, None


def _own_lookup(inner) -> bool:
    """The embedding lookup may run apart from the model's own (outside its call: the shared prefix; through a
    swapped module forward: `TiedWeight`). Not under FSDP2: the root unit's gradients are reduced (and its
    gathered weights freed) by hooks around its own forward, so a lookup outside it would give its gradient to
    freed memory. Nor for a view of a model that changes what its modules compute during its own call
    (lora.AdapterDisabled: a peft-trained copy of the embedding would answer a lookup outside it)."""
    return isinstance(inner, torch.nn.Module) and not is_sharded(inner)


def _ties(model, inner) -> bool:
    """`inner`'s lookups may go through a TiedWeight: where it applies, the lookup may run apart from the model
    (`_own_lookup`), and no compile wrapper or compiled decoder would trace the swapped lookup and its state."""
    return (
        _own_lookup(inner)
        and TiedWeight.applies(inner)
        and not (isinstance(model, torch.nn.Module) and any(stock.compiled(m) for m in model.modules()))
    )


@contextlib.contextmanager
def _tied_lookups(inner: torch.nn.Module, tie: TiedWeight | None):
    """While open, the model's embedding module looks up through `tie` (as it is: where tie is None)."""
    if tie is None:
        yield
        return
    module = inner.get_input_embeddings()
    module.forward = lambda ids: tie.embed(ids, module.padding_idx)
    try:
        yield
    finally:
        del module.forward


def _gathered_weight(head: torch.nn.Module) -> torch.Tensor:
    """The output layer's whole weight (V, H). Under FSDP2 (distributed.shard) the root unit, which holds
    the output layer, stays gathered from its forward to its backward, so after the model's forward the
    weight is the gathered parameter whose gradient FSDP reduce-scatters; a shard here would mean the root
    was set to free its parameters after forward, which the fused path cannot serve."""
    weight = head.weight
    if hasattr(weight, "placements"):  # a DTensor: this rank's shard
        raise RuntimeError(
            "the fused log-prob path needs the output layer gathered after the forward, but it holds a shard: "
            "keep FSDP2's root unit unsharded after forward (distributed.shard does)"
        )
    return weight


def _router_aux_loss(output, wanted: bool) -> torch.Tensor | None:
    if not wanted:
        return None
    if getattr(output, "aux_loss", None) is None:
        raise ValueError(
            "return_router_aux_loss: the model returned no router aux_loss (not a mixture of experts)"
        )
    return output.aux_loss


def _place(values: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(N,) values at the flat `positions` of a zero (B, T) tensor (differentiable: backward gathers)."""
    return values.new_zeros(shape[0] * shape[1]).index_copy(0, positions, values).view(shape)


def sequence_logprobs(logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum and mean of per-token log-probs over the mask. logps, mask: (B, T) -> (B,), (B,).

    A row with no target token has sum 0 and mean 0.
    """
    mask = mask.to(logps.dtype)
    total = (logps * mask).sum(-1)
    return total, total / mask.sum(-1).clamp(min=1)
