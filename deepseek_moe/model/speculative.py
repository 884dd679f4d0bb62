"""Self-speculative greedy decoding with the model's own multi-token prediction (MTP) modules as the draft.

Each step the MTP chain drafts D tokens after the last known one; the main model verifies them in one forward pass
over [last token, drafts]; the longest prefix of drafts equal to the main model's greedy choices is accepted, plus
the main model's token after it. Every emitted token is therefore the main model's greedy token: the output equals
plain greedy decoding. Rows of a batch advance together by the smallest acceptance of the step.

Model-code sibling (flat import from the modeling file), so it only depends on torch and transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput


@dataclass
class MtpGenerateOutput(ModelOutput):
    """`sequences` as `generate` returns them, plus how well the MTP draft did.

    `acceptance_rate`: drafted tokens the main model agreed with, over drafted tokens (counted per row).
    `tokens_per_step`: tokens emitted per main-model forward pass after the prefill (1.0 = plain decoding).
    """

    sequences: torch.LongTensor | None = None
    acceptance_rate: float | None = None
    tokens_per_step: float | None = None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None


def _crop_layer(cache: Cache, index: int, length: int) -> None:
    """Keep the first `length` positions of one cache layer (MTP depths each keep a different length)."""
    if index < len(cache.layers):
        extra = cache.layers[index].get_seq_length() - length
        if extra > 0:
            cache.layers[index].crop(-extra)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def mtp_greedy_generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    num_draft_tokens: int | None = None,
) -> MtpGenerateOutput:
    """Greedy decoding of `max_new_tokens` tokens drafted by the first `num_draft_tokens` MTP depths (default: all)."""
    config = model.config
    depths = config.num_nextn_predict_layers if num_draft_tokens is None else num_draft_tokens
    if not 1 <= depths <= config.num_nextn_predict_layers:
        raise ValueError(
            f"use_mtp needs 1 <= num_draft_tokens <= num_nextn_predict_layers={config.num_nextn_predict_layers}, "
            f"got {depths}"
        )
    batch_size, prompt_length = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    embed = model.model.embed_tokens
    first_mtp = config.num_hidden_layers

    cache = DynamicCache(config=config)
    prefill = model.model(input_ids, attention_mask=mask, position_ids=_positions(mask), cache=cache, use_cache=True)
    main_hidden = prefill.last_hidden_state  # h^0 for positions 0..n-1, n = cached length
    next_token = model.lm_head(main_hidden[:, -1]).argmax(-1, keepdim=True)
    tokens, mask = torch.cat([input_ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)

    mtp_cache = DynamicCache()
    mtp_hidden: list[torch.Tensor] = [main_hidden[:, :0]] * depths  # h^k buffers, positions 0..processed[k]-1
    processed = [0] * depths  # positions each depth has seen with only real (non-drafted) tokens
    drafted = accepted = steps = 0
    while tokens.shape[1] - prompt_length < max_new_tokens:
        n = tokens.shape[1] - 1  # t_n is known, not yet cached
        positions = _positions(mask)
        previous, known = main_hidden, tokens
        for k in range(1, depths + 1):
            start = processed[k - 1]
            _crop_layer(mtp_cache, first_mtp + k - 1, start)
            hidden_k, head_input = model.mtp_hidden_states(
                k,
                previous[:, start:n],
                embed(known[:, start + k : n + k]),
                mask[:, :n],
                positions[:, start:n],
                cache=mtp_cache,
            )
            mtp_hidden[k - 1] = previous = torch.cat([mtp_hidden[k - 1][:, :start], hidden_k], 1)
            draft = model.lm_head(head_input[:, -1]).argmax(-1, keepdim=True)
            known = torch.cat([known, draft], 1)
            processed[k - 1] = n - k + 1  # position i used t_{i+k}, real only while i + k <= n

        drafts = known[:, n + 1 :]
        verify_mask = torch.cat([mask, torch.ones_like(drafts)], 1)
        verify = model.model(
            known[:, n:],
            attention_mask=verify_mask,
            position_ids=_positions(verify_mask)[:, n:],
            cache=cache,
            use_cache=True,
        )
        greedy = model.lm_head(verify.last_hidden_state).argmax(-1)  # main model's choice after each input token
        agree = (drafts == greedy[:, :depths]).long().cumprod(-1).sum(-1)
        drafted += batch_size * depths
        accepted += int(agree.sum())
        steps += 1
        step_accepted = int(agree.min())
        new_tokens = torch.cat([drafts[:, :step_accepted], greedy[:, step_accepted : step_accepted + 1]], 1)
        if step_accepted < depths:
            cache.crop(step_accepted - depths)  # forget the rejected drafts
        main_hidden = torch.cat([main_hidden, verify.last_hidden_state[:, : step_accepted + 1]], 1)
        tokens = torch.cat([tokens, new_tokens], 1)
        mask = torch.cat([mask, torch.ones_like(new_tokens)], 1)

    sequences = _finish(tokens[:, : prompt_length + max_new_tokens], prompt_length, eos_token_id, pad_token_id)
    emitted = sequences.shape[1] - prompt_length
    return MtpGenerateOutput(
        sequences=sequences,
        acceptance_rate=accepted / drafted if drafted else 0.0,
        tokens_per_step=(emitted - 1) / steps if steps else 0.0,
        drafted_tokens=drafted,
        accepted_tokens=accepted,
    )


def _finish(
    tokens: torch.LongTensor, prompt_length: int, eos_token_id: int | list[int] | None, pad_token_id: int | None
) -> torch.LongTensor:
    """As `generate` does: tokens after a row's end-of-sequence become padding, and the output stops once every row
    has ended."""
    if eos_token_id is None:
        return tokens
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id, device=tokens.device)
    generated = tokens[:, prompt_length:]
    is_eos = torch.isin(generated, eos)
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    if pad_token_id is None:
        pad_token_id = int(eos[0])
    generated = generated.masked_fill(after_eos, pad_token_id)
    ended = is_eos.long().cumsum(-1) > 0
    all_ended = ended.all(0).nonzero()
    if len(all_ended):
        generated = generated[:, : int(all_ended[0]) + 1]
    return torch.cat([tokens[:, :prompt_length], generated], 1)
