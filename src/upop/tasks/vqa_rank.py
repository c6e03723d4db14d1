"""BLIP's rank inference for VQA (``rank_answer`` of salesforce/BLIP ``models/blip_vqa.py``,
``inference='rank'``) on transformers' ``BlipForQuestionAnswering``.

For a batch of questions: the image goes through ``vision_model``; the question through
``text_encoder`` with cross-attention into every image token; the decoder (``text_decoder``,
cross-attending to the question states) is run over the start token alone, and every candidate
answer gets the log-probability of its first token; the ``k`` candidates with the likeliest first
token (ties: the earlier candidate) are scored with the sum, over their tokens and the closing
``[SEP]``, of the decoder's log-probability given the question states; the best score wins (ties:
the likelier first token). Candidates are tokenized like training answers
(:func:`._blip.decoder_inputs`: ``<bos> answer [SEP]``).

The (question, candidate) rows are scored in chunks of at most :data:`LOGIT_BUDGET` logits, each
chunk cut to its longest candidate; candidate padding never changes a score (causal decoder, pad
positions not summed). The question mask is passed to the decoder's cross-attention, but
transformers 5.x drops it there, so callers batch questions of equal token length
(:meth:`upop.tasks.vqa.VQATask.predict` does).
"""
from __future__ import annotations

import torch

from upop.tasks._blip import decoder_inputs, encoder_ids

LOGIT_BUDGET = 2 ** 26
"""Most decoder logits (rows x tokens x vocabulary) computed in one call when scoring candidates."""


def encode_candidates(tokenizer, answers: list[str], model, max_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder ids ``<bos> answer [SEP] <pad>..`` and their attention mask, one row per answer."""
    enc = tokenizer(answers, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    ids, _ = decoder_inputs(enc["input_ids"], enc["attention_mask"], model)
    return ids, enc["attention_mask"]


def question_states(m, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """The question encoded by ``m.text_encoder`` with cross-attention into the image."""
    image = m.vision_model(pixel_values=pixel_values).last_hidden_state
    image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
    return m.text_encoder(input_ids=encoder_ids(m, input_ids), attention_mask=attention_mask, encoder_hidden_states=image,
                          encoder_attention_mask=image_mask).last_hidden_state


def answer_log_likelihood(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of ``log p(ids[t] | ids[:t])`` over the real tokens after the first."""
    logp = logits[:, :-1].float().log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
    return logp.masked_fill(mask[:, 1:] == 0, 0.0).sum(1)


def rank_answers(m, states: torch.Tensor, states_mask: torch.Tensor, cand_ids: torch.Tensor,
                 cand_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Index of the chosen candidate for each question (``states``: question states ``[B, L, H]``)."""
    batch, n = states.shape[0], cand_ids.shape[0]
    k = min(int(k), n)
    start = torch.full((batch, 1), m.config.text_config.bos_token_id, dtype=torch.long, device=states.device)
    first = m.text_decoder(input_ids=start, encoder_hidden_states=states, encoder_attention_mask=states_mask).logits
    first_logp = first[:, 0].float().log_softmax(-1).index_select(1, cand_ids[:, 1])  # [B, N]
    top = torch.sort(first_logp, dim=1, descending=True, stable=True).indices[:, :k]  # [B, k]

    cand, question = top.reshape(-1), torch.arange(batch, device=states.device).repeat_interleave(k)
    scores = torch.empty(batch * k, dtype=torch.float32, device=states.device)
    vocab = m.config.text_config.vocab_size
    rows = max(1, LOGIT_BUDGET // (cand_ids.shape[1] * vocab))
    for lo in range(0, batch * k, rows):
        c, q = cand[lo:lo + rows], question[lo:lo + rows]
        mask = cand_mask[c]
        length = int(mask.sum(1).max())
        ids, mask = cand_ids[c, :length], mask[:, :length]
        logits = m.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=states[q],
                                encoder_attention_mask=states_mask[q]).logits
        scores[lo:lo + len(c)] = answer_log_likelihood(logits, ids, mask)
    best = scores.view(batch, k).argmax(dim=1, keepdim=True)
    return top.gather(1, best).squeeze(1)
