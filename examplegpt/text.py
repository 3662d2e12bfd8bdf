"""The text side of generation, the same for the `generate` command, the batching engine and the server.

Tokens become text one at a time without splitting a UTF-8 character (`TextStream`); a completion's
text ends before its first stop string and is shown only once it cannot become one
(`CompletionText`); a prompt longer than the context keeps its last tokens (`crop_prompt`); a
sequence that fills the context slides to its last half (`window_after_slide`); and log-probabilities
are the model's own, recorded in OpenAI's shape (`logprobs_of`, `Logprobs`).
"""

from __future__ import annotations

import codecs

import torch

from .tokenizer import get_tokenizer


def crop_prompt(ids: list[int], context: int) -> list[int]:
    """The last (context - 1) tokens of a prompt: the context keeps room for at least one new token."""
    return ids[max(0, len(ids) - (context - 1)) :]


def window_after_slide(length: int, context: int) -> slice:
    """Where a sequence of `length` tokens that filled the context goes on from: its last half, which is
    run again from position 0 (so generation can go on for any length)."""
    return slice(length - context // 2, length)


class TextStream:
    """Turns tokens into text one at a time, never splitting a UTF-8 character across two pieces."""

    def __init__(self) -> None:
        self._bytes_of = get_tokenizer().decode_single_token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def push(self, token: int) -> str:
        """The new complete text that `token` finishes (possibly empty)."""
        piece = self._decoder.decode(self._bytes_of(token))
        self.text += piece
        return piece

    def flush(self) -> str:
        piece = self._decoder.decode(b"", final=True)
        self.text += piece
        return piece


class CompletionText:
    """The text of one completion as its tokens arrive: decoded by a TextStream, ended before the first
    of its stop strings, and handed out (`take`) only once no part of it can still become one."""

    def __init__(self, stops: list[str], logprobs: bool = False) -> None:
        self.stops = stops
        # text that might be the beginning of a stop string is held back until it is known not to be
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.stream = TextStream()
        self.text = ""
        self.taken = 0  # characters of self.text already handed out
        self.tokens: list[int] = []  # every token pushed, the one that completed a stop string included
        self.stopped = False  # a stop string ended the text
        self.finished = False  # no more tokens are taken: stopped, or `finish` was called
        self.logprobs = Logprobs() if logprobs else None

    def push(self, token: int, logprob: float | None = None, top: dict[int, float] | None = None) -> bool:
        """Add the next token (and its logprobs); True when it completed a stop string, which ends the text."""
        if self.finished:
            return False
        offset = len(self.text)
        self.tokens.append(token)
        self.text += self.stream.push(token)
        if self.logprobs is not None:
            self.logprobs.add(token, logprob, top or {}, offset)
        return self.cut_at_stop(offset)

    def finish(self) -> None:
        """No more tokens: the rest of a partial character is decoded, and stop strings looked for in it."""
        if not self.finished:
            self.text += self.stream.flush()
            self.cut_at_stop(0)
            self.finished = True

    def cut_at_stop(self, searched_up_to: int) -> bool:
        """End the text before the first stop string in it; the part before `searched_up_to` was searched already."""
        hits = [i for s in self.stops if (i := self.text.find(s, max(0, searched_up_to - len(s) + 1))) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.stopped = self.finished = True
        if self.logprobs is not None:
            self.logprobs.cut(len(self.text))
        return True

    def take(self) -> str:
        """The text not handed out yet that is safe to show (none that could still become a stop string)."""
        end = len(self.text) if self.finished else max(self.taken, len(self.text) - self.holdback)
        piece = self.text[self.taken : end]
        self.taken = end
        return piece


def logprobs_of(logits: torch.Tensor, token: int, top: int) -> tuple[float, dict[int, float]]:
    """The log-probability of `token` under logits (V,), and the `top` most likely tokens' log-probabilities."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (V,)
    values, ids = torch.topk(log_probs, top) if top else (log_probs[:0], log_probs[:0].long())
    return float(log_probs[token]), dict(zip(ids.tolist(), values.tolist()))


def token_text(token: int) -> str:
    """A token as text for logprobs; a token that is part of a UTF-8 character is shown as OpenAI does, `bytes:\\xNN`."""
    raw = get_tokenizer().decode_single_token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class Logprobs:
    """OpenAI's `logprobs` of a completion: per token, its text, log-probability, the most likely
    alternatives' and the offset of its text in the completion."""

    def __init__(self) -> None:
        self.lists: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.taken = 0  # tokens already handed out by `take`

    def add(self, token: int, logprob: float | None, top: dict[int, float], offset: int) -> None:
        self.lists["tokens"].append(token_text(token))
        self.lists["token_logprobs"].append(logprob)
        self.lists["top_logprobs"].append({token_text(t): lp for t, lp in top.items()})
        self.lists["text_offset"].append(offset)

    def cut(self, length: int) -> None:
        """Drop the tokens that begin at or after character `length` (the text was cut there)."""
        keep = sum(1 for offset in self.lists["text_offset"] if offset < length)
        for values in self.lists.values():
            del values[keep:]

    def take(self) -> dict:
        """The entries not handed out yet."""
        start, self.taken = self.taken, len(self.lists["tokens"])
        return {key: values[start:] for key, values in self.lists.items()}
