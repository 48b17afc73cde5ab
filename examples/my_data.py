"""A dataset of your own, with a natural partition: samples grouped by the "site" that recorded them.

mpifed calls the factory on every rank, with `seed` (run.seed) and `root` (data.root) when it names
them, plus the job's data.options. It returns mpifed.learn.Data: train and test as (inputs, targets)
arrays (or tensors, or a torch Dataset), the number of classes (or a vocab for next-token data) and,
optionally, `clients`: which client each training sample belongs to.
"""

import numpy as np

from mpifed.learn import Data


def sites(seed, sites=12, per_site=100, features=20, classes=4):
    """Each site sees every class at its own mix (label skew) and measures with its own offset
    (feature skew), as hospitals with different patients and different scanners would."""
    gen = np.random.default_rng(seed)
    centers = gen.normal(0.0, 0.35, size=(classes, features))
    xs, ys, names = [], [], []
    for site in range(sites):
        mix = gen.dirichlet(np.full(classes, 1.0))
        labels = gen.choice(classes, size=per_site, p=mix)
        offset = gen.normal(0.0, 0.3, size=features)
        xs.append(centers[labels] + offset + gen.normal(0.0, 1.0, size=(per_site, features)))
        ys.append(labels)
        names += [f"site-{site:02d}"] * per_site
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys)
    names = np.array(names)
    test = gen.random(len(y)) < 0.2  # a fifth of each site's samples held out for the server's test set
    return Data(train=(x[~test], y[~test]), test=(x[test], y[test]), classes=classes, clients=names[~test])
