"""The methods of :func:`tokenpool_ops.pool` and what sets them apart, declared once."""

from __future__ import annotations

from typing import Literal

from ._compat import Array

__all__ = ["CLUSTERING_METHODS", "EMPTY_CLUSTER_METHODS", "INITS", "MATCHING_METHODS",
           "MERGING_METHODS", "METHODS", "NEEDS_SCORES", "SELECTION_METHODS", "USES_SCORES",
           "WEIGHTED_METHODS", "Detail", "Init", "Method"]

Method = Literal["kmeans", "kmedoids", "wkmeans", "wkmedoids", "topk", "random", "importance",
                 "tome"]
Init = Literal["topk", "random", "spread"] | Array | None
#: What of a PoolResult a call computes (the rest is None): the tokens and their sizes
#: ('tokens'); the plan that ``tokenpool_ops.nn.merge`` applies, i.e. no objective and, for
#: the selection baselines, no assignment (each costs a pass over the tokens: 'plan'); or
#: everything ('info').
Detail = Literal["tokens", "plan", "info"]

CLUSTERING_METHODS = ("kmeans", "kmedoids", "wkmeans", "wkmedoids")
SELECTION_METHODS = ("topk", "random", "importance")
#: ToMe's bipartite soft matching (Bolya et al., ICLR 2023): merges, guided by a metric.
MATCHING_METHODS = ("tome",)
#: Methods whose output tokens are the size- (or score-) weighted means of their members.
MERGING_METHODS = CLUSTERING_METHODS + MATCHING_METHODS
METHODS = CLUSTERING_METHODS + SELECTION_METHODS + MATCHING_METHODS
#: Methods that weigh or rank tokens by significance scores when they are given.
USES_SCORES = ("wkmeans", "wkmedoids", "topk", "importance")
#: Methods that can leave a pooled token of size 0 (an empty K-Means cluster); every other
#: method's tokens stand for at least one original token each.
EMPTY_CLUSTER_METHODS = ("kmeans", "wkmeans")
#: Methods whose weights are the scores (times the sizes), Eq. 13; the others weigh every
#: token by its size alone.
WEIGHTED_METHODS = ("wkmeans", "wkmedoids")
#: Methods that have no meaning without scores. The w-methods without scores treat every
#: token as equally significant, i.e. they are their unweighted forms.
NEEDS_SCORES = ("topk", "importance")
#: The named initialisations (an integer array of token indices is the other kind).
INITS = ("topk", "random", "spread")
