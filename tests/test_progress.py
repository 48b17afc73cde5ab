"""Rank 0's progress lines: the rate is over the rounds since the last line, not the last round's."""

from mpifed.progress import Progress


def test_the_rate_covers_every_round_since_the_last_line(capsys):
    progress = Progress("log", rounds=6, every=3)
    for done, seconds in enumerate([0.1, 0.1, 1.0, 0.2, 0.2, 0.6], start=1):  # rounds 3 and 6 evaluate
        progress.update(done, loss=1.0, acc=0.5 if done % 3 == 0 else None, samples=100, seconds=seconds)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["round 3/6  loss 1.000  acc 0.500  250 samples/s",   # 300 samples in 1.2 s
                     "round 6/6  loss 1.000  acc 0.500  300 samples/s"]   # 300 in 1.0 s: counted afresh
