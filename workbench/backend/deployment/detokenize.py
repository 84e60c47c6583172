"""Token ids to completion text, stop strings, and the per-request sink every replica reports to.

    sink = ChoiceSink(replica, Choice(index, prompt_ids, params, tokenizer), tokenizer, post, stream_text)
    sink.bind(replica.submit(GenerationRequest(prompt_ids, params, arrival), sink))   # one per choice
    # the replica calls sink.on_events(...) from its thread; `post(item)` gets, in order:
    #   ("chunk", choice, tokens, text_delta, first)   streamed choices only
    #   ("final", choice)                              once; choice.finish_reason, text... set

This is the wire layer's half of generation: replicas produce token ids (`replica.py`), and text is
made here, in the replica's thread (never on the event loop), the same way for every engine.
Streaming text never splits a multi-byte character (`IncrementalDetokenizer`, vLLM's scheme), and
text that could still become a stop string is held back. When a choice's text reaches a stop string
the text is cut before it, finish_reason is "stop", the tokens after the one that completed it are
dropped, and the replica is told to cancel the request (its "cancelled" FinalEvent then closes it).
"""

from __future__ import annotations

import threading
from typing import Callable

from .replica import FinalEvent, SamplingParams, TokenEvent, TokenInfo


class IncrementalDetokenizer:
    """Streams text for a growing token list without splitting multi-byte characters (vLLM's scheme:
    decode a short window, emit only what is stable, never a trailing U+FFFD)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is left undecoded (possibly a lone replacement character) at the end."""
        rest = self._decode(self.ids[self.prefix:])
        done = self._decode(self.ids[self.prefix:self.read])
        self.prefix = self.read = len(self.ids)
        return rest[len(done):] if rest.startswith(done) else rest


class TokenText:
    """token_id -> its text (special tokens included), cached: used for logprob entries."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self.cache[token_id] = s
        return s


def find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index of the earliest stop string in text[start:], or None."""
    best = None
    for st in stops:
        i = text.find(st, start)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


class Choice:
    """One choice of a completion as the wire layer sees it: accepted tokens, text, outcome."""

    def __init__(self, index: int, prompt_ids: list[int], params: SamplingParams, tokenizer):
        self.index = index
        self.prompt_ids = prompt_ids
        self.params = params
        self.handle = None
        self.echo: list[TokenInfo] = []
        self.output: list[TokenInfo] = []
        self.text = ""                 # completion text so far (stop strings cut off)
        self.emitted = 0               # characters of `text` already sent in chunks
        self.detok = IncrementalDetokenizer(tokenizer) if params.stream or params.stop else None
        self.finish_reason: str | None = None
        self.stopped = False           # a stop string ended it; later tokens are dropped
        self.done = False
        self.error: str | None = None
        self.timings: dict = {}
        self.snapshots: list[str | None] = []

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.output]


class ChoiceSink:
    """The `GenerationSink` of one choice: turns the replica's events into text and hands results to
    `post` (thread-safe; the server posts them onto its event loop)."""

    def __init__(self, replica, choice: Choice, tokenizer, post: Callable[[tuple], None], stream_text: bool):
        self.replica = replica
        self.c = choice
        self.tok = tokenizer
        self.post = post
        self.stream_text = stream_text  # the client streams: post a chunk per token event
        self.lock = threading.Lock()    # bind() and a replica that reports from inside submit()

    def bind(self, handle) -> None:
        """Record the replica's handle (what submit returned); cancels at once if a stop string was
        already reached by then."""
        with self.lock:
            self.c.handle = handle
            late_cancel = self.c.stopped and not self.c.done
        if late_cancel:
            self.replica.cancel(handle)

    def on_events(self, events: list) -> None:
        c = self.c
        for ev in events:
            if c.done:
                return
            if isinstance(ev, TokenEvent):
                self._tokens(c, ev)
            elif isinstance(ev, FinalEvent):
                self._final(c, ev)

    def _cancel(self, c: Choice) -> None:
        with self.lock:
            handle = c.handle
        if handle is not None:
            self.replica.cancel(handle)

    def _tokens(self, c: Choice, ev: TokenEvent) -> None:
        if c.stopped:
            return
        if ev.snapshot not in c.snapshots:
            c.snapshots = c.snapshots + [ev.snapshot]   # a new list: the event loop may be reading it
        tokens = list(ev.tokens)
        if ev.first and c.params.echo_count:
            k = min(c.params.echo_count, len(tokens))
            c.echo, tokens = tokens[:k], tokens[k:]
        accepted = []
        for info in tokens:
            accepted.append(info)
            c.output.append(info)
            c.text += c.detok.push(info.token_id)
            if c.params.stop:
                cut = find_stop(c.text, c.params.stop, max(0, c.emitted - max(len(x) for x in c.params.stop)))
                if cut is not None:
                    with self.lock:
                        c.text, c.finish_reason, c.stopped = c.text[:cut], "stop", True
                    self._cancel(c)
                    break
        if self.stream_text:
            if c.stopped:
                safe = len(c.text)
            else:
                hold = max((len(x) for x in c.params.stop), default=1) - 1
                safe = max(c.emitted, len(c.text) - hold)
            delta = c.text[c.emitted:safe]
            c.emitted = safe
            self.post(("chunk", c, (c.echo if ev.first else []) + accepted, delta, ev.first))

    def _final(self, c: Choice, ev: FinalEvent) -> None:
        c.timings, c.snapshots, c.error = ev.timings, ev.snapshots, ev.error
        if not c.echo:
            c.echo = list(ev.echo)
        if ev.error is not None:
            c.finish_reason = "error"
        elif not c.stopped:
            c.finish_reason = ev.finish_reason
            if c.detok is None:        # no token events were asked for: decode the whole output once
                c.output = list(ev.output)
                c.text = self.tok.decode(c.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            else:
                # a replica may report tokens in its FinalEvent that no TokenEvent carried
                for info in ev.output[len(c.output):]:
                    c.output.append(info)
                    c.text += c.detok.push(info.token_id)
                c.text += c.detok.flush()
                if c.params.stop:
                    cut = find_stop(c.text, c.params.stop, 0)
                    if cut is not None:
                        c.text, c.finish_reason = c.text[:cut], "stop"
        c.done = True
        self.post(("final", c))
