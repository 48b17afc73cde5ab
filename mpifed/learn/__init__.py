"""What is learned: models and datasets (built-in or the user's own factories), tasks, sample sets.

A user's dataset factory returns `mpifed.learn.Data`; see mpifed.learn.userdata.
"""

from mpifed.learn.userdata import Data

__all__ = ["Data"]
