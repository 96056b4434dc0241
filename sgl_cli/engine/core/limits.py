"""A bound on the tokenizer's work per item, by the models' context, before the prompt is tokenized whole.

A question just under the 64 MiB line cap took a minute and 8 GB to tokenize, only to be refused as over the
context. Bounds are in characters per token of the prompt's budget (the context less the answer, or
`max_prompt_tokens` when smaller): text of up to PREFIX_CHARS a token is tokenized whole, as usual (the engine's
exact check follows); longer text has only its first PREFIX_CHARS a token counted (real text runs 2-6 characters
a token, so that prefix alone is over the budget) and is refused when that prefix is; text over MAX_CHARS a token
(only long runs of one character come near it) is refused untokenized. A cut can change how the tokens at it
merge: CUT_SLACK tokens are not counted.
"""

from __future__ import annotations

from typing import Any

from ..errors import ItemError
from ..io.items import Item

PREFIX_CHARS = 8
MAX_CHARS = 64
CUT_SLACK = 16


def check_text(item: Item, tokenizer: Any, context: int, settings: Any) -> None:
    """Raise ItemError for an item whose text is far over the prompt's budget, tokenizing at most a bounded
    prefix of it (`settings`: the run's, for `max_new_tokens`, `max_prompt_tokens` and `prompt_suffix`)."""
    answer = item.max_new_tokens or settings.max_new_tokens
    if answer >= context:  # no budget at all: say so, not that the text is long for a budget of one token
        raise ItemError(item.fail(f"max_new_tokens {answer:,} leaves no room for a prompt in the models' context of "
                                  f"{context:,} tokens"))
    cap = settings.max_prompt_tokens
    by_cap = cap is not None and cap <= context - answer
    budget = max(1, cap if by_cap else context - answer)
    texts = [part["text"] for turn in item.messages(settings.prompt_suffix.strip())
             for part in (turn["content"] if isinstance(turn["content"], list) else
                          [{"type": "text", "text": turn["content"]}]) if part.get("type") == "text"]
    chars = sum(len(t) for t in texts)
    if chars <= PREFIX_CHARS * budget:
        return
    over = f"over max_prompt_tokens {cap:,}" if by_cap else (
        f"with up to {answer} answer tokens that is over the models' context of {context:,} tokens")
    head = "\n".join(texts)[: PREFIX_CHARS * budget]
    n = len(tokenizer(head, add_special_tokens=False)["input_ids"]) - CUT_SLACK
    if n > budget:
        raise ItemError(item.fail(f"the prompt is over {n:,} tokens (counted in the first {len(head):,} of its "
                                  f"{chars:,} characters); {over}"))
    if chars > MAX_CHARS * budget:
        raise ItemError(item.fail(f"the prompt's text is {chars:,} characters, over {MAX_CHARS} a token of the "
                                  f"{budget:,} it may take (refused without tokenizing it); {over}"))
