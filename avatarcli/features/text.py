"""Prompt -> umT5 token features, zero past each prompt's real length, padded to the model's text length."""

from __future__ import annotations

import html
import re

import ftfy
import torch
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from avatarcli.features.prompts import NEGATIVE_PROMPT  # noqa: F401  (re-exported)

TEXT_LEN = 512


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' clean: fix mojibake, unescape HTML twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompts(
    text_encoder: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
    text_len: int = TEXT_LEN, device: str | torch.device | None = None,
) -> torch.Tensor:
    """[B, text_len, D] features in the encoder's dtype; rows past a prompt's length (its tokens + eos) are zero.

    The reference trims each prompt's features to its real length and zero-pads to 512 before the DiT's text MLP;
    zeroing here gives the same tensor at a fixed shape.
    """
    device = torch.device(device) if device is not None else text_encoder.device
    tokens = tokenizer(
        [clean_prompt(p) for p in prompts], padding="max_length", truncation=True, max_length=text_len,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    features = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return features.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
