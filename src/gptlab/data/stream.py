"""Streaming training windows from text files (JSONL, Parquet, .txt), tokenized on the fly, never all in memory.

    stream = TokenStream("corpus/", tok, max_length=256, rank=0, world=1)   # a directory of .jsonl / .parquet
    batches = StreamBatches(stream, batch_size=8)
    x, y = batches.batch(0)                # (8, 256) inputs, targets; then batch(1), batch(2), ... in order
    state = batches.state_dict(2)          # the position before micro-batch 2; saved in the checkpoint
    batches.load_state_dict(state)         # a new process continues exactly there

Documents are numbered in corpus order (:mod:`gptlab.data.sources`, pieces of
at most ``piece_bytes``); document ``d`` belongs to rank ``d % world``, so
ranks read disjoint documents. Every ``val_every``-th document (``d %
val_every == 0``) is held out for validation, the rest is training text. A
rank's documents are tokenized, each followed by the end-of-text id, and
packed into rows of ``max_length + 1`` tokens that overlap by one (the last
target of a row is the first input of the next). At the end of the corpus the
stream starts its next epoch.

The position is ``(epoch, piece, document within the piece, the tokens not yet
packed)``: resuming seeks to the piece, re-reads (without tokenizing) the
documents before the position inside it, and continues with the saved tokens,
so the resumed batches are exactly the uninterrupted ones. Parquet needs
``pyarrow``; nothing else is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from gptlab.data.sources import Piece, iter_documents, list_sources, plan_shards
from gptlab.errors import GptlabError

PIECE_BYTES = 64 << 20


class TokenStream:
    """Rows of ``max_length + 1`` token ids from one rank's share of a corpus, with a resumable position."""

    def __init__(self, spec: str | Path, tokenizer, max_length: int, *, rank: int = 0, world: int = 1,
                 split: str = "train", val_every: int = 10, piece_bytes: int = PIECE_BYTES):
        if not 0 <= rank < world:
            raise GptlabError(f"rank {rank} must be in [0, world={world})")
        if split not in ("train", "val"):
            raise GptlabError(f"split {split!r} must be train or val")
        if max_length < 1 or val_every < 2:
            raise GptlabError(f"max_length={max_length} must be >= 1 and val_every={val_every} >= 2")
        self.spec, self.tok, self.L = str(spec), tokenizer, max_length
        self.rank, self.world, self.split, self.val_every = rank, world, split, val_every
        sources = list_sources(spec)
        self.root = str(Path(spec).expanduser().resolve()) if Path(str(spec)).expanduser().is_dir() else None
        self.pieces: list[Piece] = [p for shard in plan_shards(sources, piece_bytes) for p in shard]
        self.eos = tokenizer.eos_id
        self.epoch, self.piece, self.doc_in_piece, self.doc = 0, 0, 0, 0
        self.buffer = np.empty(0, dtype=np.int64)
        self._docs: Iterator | None = None

    def _mine(self, d: int) -> bool:
        """Is document ``d`` (corpus order) in this stream's split, and this rank's? Ranks take turns within
        the split, so each gets an even share of both splits whatever ``world`` and ``val_every`` are."""
        held_out = d % self.val_every == 0
        if held_out != (self.split == "val"):
            return False
        nth = d // self.val_every if held_out else d - (d + self.val_every - 1) // self.val_every
        return nth % self.world == self.rank

    def _open_piece(self, skip: int) -> None:
        self._docs = iter_documents(self.pieces[self.piece], self.root)
        for _ in range(skip):
            next(self._docs, None)

    def _next_document(self) -> str | None:
        """The next document of this rank (advancing pieces and epochs), or None when the corpus has none."""
        empty_epochs = 0
        while True:
            if self._docs is None:
                self._open_piece(self.doc_in_piece)
            item = next(self._docs, None)
            if item is None:
                self.piece, self.doc_in_piece, self._docs = self.piece + 1, 0, None
                if self.piece == len(self.pieces):
                    self.epoch, self.piece, self.doc = self.epoch + 1, 0, 0
                    empty_epochs += 1
                    if empty_epochs > 1:
                        return None
                continue
            d = self.doc
            self.doc, self.doc_in_piece = d + 1, self.doc_in_piece + 1
            if self._mine(d):
                empty_epochs = 0
                return item[1]

    def next_row(self) -> np.ndarray:
        """The next ``(max_length + 1,)`` row of ids."""
        while len(self.buffer) < self.L + 1:
            text = self._next_document()
            if text is None:
                raise GptlabError(f"{self.spec}: rank {self.rank} of {self.world} has no {self.split} documents; "
                                  "give more documents (or fewer processes)")
            ids = self.tok.encode_array(text).astype(np.int64)
            extra = [self.eos] if self.eos is not None else []
            self.buffer = np.concatenate([self.buffer, ids, np.asarray(extra, dtype=np.int64)])
        row = self.buffer[:self.L + 1]
        self.buffer = self.buffer[self.L:]
        return row

    def state_dict(self) -> dict:
        """The position: epoch, piece, documents read in it, the global document count, unpacked tokens."""
        return {"kind": "stream", "spec": self.spec, "rank": self.rank, "world": self.world, "split": self.split,
                "epoch": self.epoch, "piece": self.piece, "doc_in_piece": self.doc_in_piece, "doc": self.doc,
                "buffer": self.buffer.copy()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (same corpus, rank and world)."""
        if state.get("split") != self.split:
            raise GptlabError(f"the saved stream position is of the {state.get('split')} split, not {self.split}")
        if (state.get("rank"), state.get("world")) != (self.rank, self.world):
            raise GptlabError(f"the saved stream position is rank {state.get('rank')} of {state.get('world')} "
                              f"processes, this is rank {self.rank} of {self.world}: a checkpoint holds rank 0's "
                              "position only, so only a one-process streamed run resumes, with 1 process")
        if state["piece"] > len(self.pieces):
            raise GptlabError(f"the saved stream position (piece {state['piece']}) is past the end of {self.spec}; "
                              "the corpus changed since the checkpoint")
        self.epoch, self.piece, self.doc_in_piece, self.doc = (state["epoch"], state["piece"],
                                                              state["doc_in_piece"], state["doc"])
        self.buffer = np.asarray(state["buffer"], dtype=np.int64).copy()
        self._docs = None


class StreamBatches:
    """The training loop's batch source over a :class:`TokenStream`: micro-batches are read in order.

    ``batch(i)`` must be asked for ``i = 0, 1, 2, ...`` (or from the step a
    loaded state is at). :meth:`state_dict` gives the position before any of the
    last ``keep`` micro-batches, which is what a checkpoint records.
    """

    def __init__(self, stream: TokenStream, batch_size: int, *, eval_stream: TokenStream | None = None,
                 batches_per_epoch: int = 1000, keep: int = 256):
        if batch_size < 1:
            raise GptlabError(f"batch_size={batch_size} must be >= 1")
        self.stream, self.bs, self.eval_stream = stream, batch_size, eval_stream
        self.tokens_per_item, self.batches_per_epoch, self.keep = stream.L, batches_per_epoch, keep
        self.n = batches_per_epoch * batch_size  # rows per nominal epoch (a stream's size is not known ahead)
        self.next_step = 0
        self._states: dict[int, dict] = {0: stream.state_dict()}

    def shard(self, rank: int, world: int) -> "StreamBatches":
        """Make this rank read its part (``batch_size / world`` rows) of every global batch, from its own
        documents (see :class:`TokenStream`); returns self.

        Each rank's position is its own; a checkpoint written by the main rank holds rank 0's, so only a
        one-process streamed run resumes (on another process count the saved position is refused, naming why).
        """
        if self.bs % world:
            raise GptlabError(f"the global batch of {self.bs} does not split into {world} equal parts; "
                              f"give a batch size that {world} processes divide")
        if (rank, world) != (self.stream.rank, self.stream.world):
            saved = self.stream.state_dict() if self.next_step else None
            self.stream.rank, self.stream.world = rank, world
            if saved is not None:
                self.stream.load_state_dict(saved)  # refuses: the saved position is another rank's
            self._states = {self.next_step: self.stream.state_dict()}
        return self

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``step``: ``(batch_size, max_length)`` inputs and targets."""
        if step != self.next_step:
            if step not in self._states:
                raise GptlabError(f"a streamed corpus is read in order: asked for micro-batch {step}, the stream "
                                  f"is at {self.next_step}")
            self.stream.load_state_dict(self._states[step])
            self.next_step = step
        part = self.bs // self.stream.world
        rows = torch.from_numpy(np.stack([self.stream.next_row() for _ in range(part)]))  # (B / world, L+1)
        self.next_step += 1
        self._states[self.next_step] = self.stream.state_dict()
        for old in [s for s in self._states if s < self.next_step - self.keep]:
            del self._states[old]
        return rows[:, :-1], rows[:, 1:]

    def epoch_of(self, step: int) -> float:
        return step / self.batches_per_epoch

    def fixed_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` batches from the start of the evaluation stream (the held-out split by default)."""
        ev = self.eval_stream or self.stream
        saved = ev.state_dict()
        ev.load_state_dict({**saved, "epoch": 0, "piece": 0, "doc_in_piece": 0, "doc": 0,
                            "buffer": np.empty(0, dtype=np.int64)})
        out = []
        for _ in range(n):
            rows = torch.from_numpy(np.stack([ev.next_row() for _ in range(self.bs)]))
            out.append((rows[:, :-1], rows[:, 1:]))
        ev.load_state_dict(saved)
        return out

    def state_dict(self, step: int) -> dict:
        """The stream position before micro-batch ``step`` (one of the last ``keep``)."""
        if step not in self._states:
            raise GptlabError(f"no stream position kept for micro-batch {step} (at {self.next_step})")
        return {**self._states[step], "micro_step": step}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Continue at micro-batch ``step`` from the saved position."""
        self.stream.load_state_dict(state)
        self.next_step = step
        self._states = {step: self.stream.state_dict()}

    def check_state(self, state: dict | None) -> None:
        """Nothing to refuse: :meth:`load_state_dict` checks rank and world."""
