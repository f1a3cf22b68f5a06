"""Place recognition for loop closure: which earlier keyframe shows the place this one shows.

Two descriptors, compared on the development set (``tools/eval_places.py``, figures in
docs/ACCURACY.md):

* ``bow``: a bag of visual words on the keyframes' ORB descriptors. The vocabulary (``words``
  binary centroids, k-means on the descriptor bits) is learnt from the stream's own first
  ``vocab_keyframes`` keyframes -- nothing is downloaded or shipped -- and each keyframe becomes
  a TF-IDF histogram (inverse document frequencies over the database), compared by cosine.
* ``tokens``: the mean of the network's encoder tokens (``FrameResult.descriptor``), centred by
  the database's running mean and compared by cosine.

:class:`PlaceDatabase` keeps one descriptor per keyframe id and answers :meth:`~PlaceDatabase.query`
with the best earlier keyframes outside the recent ones; the score is normalised by the query's
score with its own previous keyframe (DBoW2's trick), so a threshold means the same in a
textured and a bland scene.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["PlaceDatabase", "BowVocabulary", "PLACE_DESCRIPTORS"]

PLACE_DESCRIPTORS = ("bow", "tokens")


class BowVocabulary:
    """``words`` binary visual words learnt from ORB descriptors ``(N, 32)`` uint8."""

    _snapshot_fields = ("words",)

    def _after_restore(self) -> None:
        import cv2

        self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)

    def __init__(self, descriptors: np.ndarray, words: int = 256, seed: int = 0) -> None:
        import cv2

        bits = np.unpackbits(descriptors, axis=1).astype(np.float32)
        k = int(min(words, max(2, len(bits) // 4)))
        cv2.setRNGSeed(seed)
        crit = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_MAX_ITER, 15, 0.01)
        _, _, centres = cv2.kmeans(bits, k, None, crit, 1, cv2.KMEANS_PP_CENTERS)
        self.words = np.packbits(centres > 0.5, axis=1)
        self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)

    def __len__(self) -> int:
        return len(self.words)

    def histogram(self, descriptors: np.ndarray) -> np.ndarray:
        """Word counts ``(words,)`` float64 of ORB descriptors."""
        h = np.zeros(len(self.words))
        if descriptors is None or len(descriptors) == 0:
            return h
        m = self._matcher.match(descriptors, self.words)
        np.add.at(h, [x.trainIdx for x in m], 1.0)
        return h


class PlaceDatabase:
    """Args:
        kind: ``bow`` or ``tokens``.
        vocab_keyframes: ``bow``: keyframes whose descriptors train the vocabulary.
        words: ``bow``: vocabulary size.
    """

    _snapshot_fields = ("kind", "vocab_keyframes", "n_words", "vocab", "_pending", "ids", "_vecs", "_df", "_sum")

    def __init__(self, kind: str = "bow", vocab_keyframes: int = 10, words: int = 256) -> None:
        if kind not in PLACE_DESCRIPTORS:
            raise ValueError(f"place descriptor must be one of {', '.join(PLACE_DESCRIPTORS)}, got {kind!r}")
        self.kind, self.vocab_keyframes, self.n_words = kind, vocab_keyframes, words
        self.vocab: Optional[BowVocabulary] = None
        self._pending: list[tuple[int, np.ndarray]] = []  # bow: (id, ORB descriptors) before the vocabulary
        self.ids: list[int] = []
        self._vecs: list[np.ndarray] = []  # bow: word counts; tokens: raw descriptors
        self._df: Optional[np.ndarray] = None  # bow: in how many keyframes each word occurs
        self._sum: Optional[np.ndarray] = None  # tokens: running sum (centring)

    def __len__(self) -> int:
        return len(self.ids) + len(self._pending)

    # ------------------------------------------------------------------------------------------

    def _bow_add(self, kid: int, desc: np.ndarray) -> None:
        h = self.vocab.histogram(desc)
        self.ids.append(kid)
        self._vecs.append(h.astype(np.float32))
        self._df += h > 0

    def add(self, kid: int, desc: np.ndarray) -> None:
        """Add keyframe ``kid``: ORB descriptors ``(N, 32)`` uint8 (``bow``) or a token vector (``tokens``)."""
        if self.kind == "tokens":
            v = np.asarray(desc, np.float64).reshape(-1)
            self._sum = v.copy() if self._sum is None else self._sum + v
            self.ids.append(kid)
            self._vecs.append(v.astype(np.float32))
            return
        if self.vocab is None:
            self._pending.append((kid, desc))
            if len(self._pending) >= self.vocab_keyframes:
                parts = [d for _, d in self._pending if d is not None and len(d)]
                allx = np.concatenate(parts) if parts else np.zeros((0, 32), np.uint8)
                if len(allx) >= 8:
                    self.vocab = BowVocabulary(allx, self.n_words)
                    self._df = np.zeros(len(self.vocab))
                    for k, d in self._pending:
                        self._bow_add(k, d)
                    self._pending = []
            return
        self._bow_add(kid, desc)

    def remove(self, kids: set) -> None:
        """Forget keyframes (database culling)."""
        keep = [n for n, k in enumerate(self.ids) if k not in kids]
        for n, k in enumerate(self.ids):
            if k in kids:
                if self.kind == "tokens":
                    self._sum = self._sum - self._vecs[n]
                else:
                    self._df -= self._vecs[n] > 0
        self.ids = [self.ids[n] for n in keep]
        self._vecs = [self._vecs[n] for n in keep]
        self._pending = [(k, d) for k, d in self._pending if k not in kids]

    # ------------------------------------------------------------------------------------------

    def _matrix(self, q) -> tuple[np.ndarray, np.ndarray]:
        """Normalised database rows ``(M, D)`` and the normalised query ``(D,)``."""
        V = np.asarray(self._vecs, np.float64)
        if self.kind == "tokens":
            mean = self._sum / max(1, len(self.ids))
            V = V - mean
            q = np.asarray(q, np.float64).reshape(-1) - mean
        else:
            idf = np.log((len(self.ids) + 1.0) / (self._df + 1.0))
            V = (V / np.maximum(V.sum(1, keepdims=True), 1)) * idf
            h = self.vocab.histogram(q)
            q = (h / max(h.sum(), 1)) * idf
        V = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-12)
        q = q / max(np.linalg.norm(q), 1e-12)
        return V, q

    def query(self, desc, before: int, top: int = 3, reference: Optional[int] = None) -> list[tuple[int, float]]:
        """The best ``top`` keyframes with id ``< before``, best first, as ``(id, score)``.

        ``score`` is the cosine similarity divided by the query's similarity with keyframe
        ``reference`` (its previous keyframe) when given: ``>= 1`` means as alike as its neighbour.
        """
        if not self.ids or (self.kind == "bow" and self.vocab is None):
            return []
        V, q = self._matrix(desc)
        sims = V @ q
        ids = np.asarray(self.ids)
        norm = 1.0
        if reference is not None:
            hit = np.flatnonzero(ids == reference)
            if len(hit):
                norm = max(float(sims[hit[0]]), 1e-3)
        cand = np.flatnonzero(ids < before)
        if len(cand) == 0:
            return []
        best = cand[np.argsort(-sims[cand], kind="stable")[:top]]
        return [(int(ids[n]), float(sims[n] / norm)) for n in best]
