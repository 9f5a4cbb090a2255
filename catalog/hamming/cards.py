"""What a search result shows (its card: the product's fields, the image, the landmarks), kept per web process beside
the memory index, so that the fine stage returns its winners without a PostgreSQL round trip.

A card is keyed by embedding id (the image and the landmarks are the embedding's, the rest its product's); the
values are opaque here (catalog.search builds them). Kept exact by the change log the memory index already follows:
migration 0013 makes the database log every change of what a card shows (op "card": a product's fields, an image's
file, an embedding's image or landmarks, a merchant's slug), and the index's replay hands every change it reads to
`forget` before the next search. A full reload of the index clears the cache (the changes it skipped are unknown).

Bounded (least recently used first out): a shop's searches land on its popular products again and again, and the
cards of a 1M-product catalog (~1 KB each as Python objects) would not belong in every web process.

A miss is read from PostgreSQL by the caller and offered back with `put`, along with the `token` its `get` returned:
a change read by the index between that `get` and the `put` may concern a card the caller read before the change
committed, so such cards are not kept (the next search reads them again).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

DEFAULT_CAPACITY = 100_000  # cards; settings.SEARCH_CARD_CACHE wins (0: no cache, every search reads PostgreSQL)
RECENT_FORGETS = 64  # change batches remembered for `put`'s check; a reader older than these keeps nothing


class CardCache:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = max(0, int(capacity))
        self._lock = threading.Lock()
        self._cards: OrderedDict[int, tuple[int, Any]] = OrderedDict()  # embedding id -> (product id, card)
        self._of_product: dict[int, set[int]] = {}  # product id -> its embedding ids held here
        self._generation = 0  # forget batches so far
        # (generation, embedding ids, product ids, everything) of the last RECENT_FORGETS batches
        self._recent: deque[tuple[int, frozenset[int], frozenset[int], bool]] = deque(maxlen=RECENT_FORGETS)
        self.hits = 0
        self.misses = 0

    def get(self, embedding_ids: Iterable[int]) -> tuple[dict[int, Any], int]:
        """The cards held for these embeddings (the others are misses), and the token `put` wants back."""
        found: dict[int, Any] = {}
        with self._lock:
            for embedding_id in embedding_ids:
                held = self._cards.get(embedding_id)
                if held is None:
                    self.misses += 1
                    continue
                self._cards.move_to_end(embedding_id)
                found[embedding_id] = held[1]
                self.hits += 1
            return found, self._generation

    def put(self, cards: dict[int, tuple[int, Any]], *, token: int) -> None:
        """Keep these cards (embedding id -> (product id, card)) read from PostgreSQL after `get` returned `token`,
        except those a change read since then may concern."""
        if not self.capacity or not cards:
            return
        with self._lock:
            if token != self._generation:
                if self._generation - token > len(self._recent):
                    return  # too many changes since: which cards they concern is no longer known
                since = [batch for batch in self._recent if batch[0] > token]
                if any(everything for *_, everything in since):
                    return
                stale_embeddings = frozenset().union(*(batch[1] for batch in since))
                stale_products = frozenset().union(*(batch[2] for batch in since))
                cards = {
                    e: held for e, held in cards.items() if e not in stale_embeddings and held[0] not in stale_products
                }
            for embedding_id, (product_id, card) in cards.items():
                self._cards[embedding_id] = (product_id, card)
                self._cards.move_to_end(embedding_id)
                self._of_product.setdefault(product_id, set()).add(embedding_id)
            while len(self._cards) > self.capacity:
                embedding_id, (product_id, _) = self._cards.popitem(last=False)
                self._unlink(embedding_id, product_id)

    def forget(self, *, embedding_ids: Iterable[int] = (), product_ids: Iterable[int] = (), everything: bool = False):
        """Drop the cards these changes may concern (called by the index's change-log replay)."""
        embeddings, products = frozenset(embedding_ids), frozenset(product_ids)
        if not (embeddings or products or everything):
            return
        with self._lock:
            self._generation += 1
            self._recent.append((self._generation, embeddings, products, everything))
            if everything:
                self._cards.clear()
                self._of_product.clear()
                return
            for embedding_id in embeddings:
                held = self._cards.pop(embedding_id, None)
                if held is not None:
                    self._unlink(embedding_id, held[0])
            for product_id in products:
                for embedding_id in self._of_product.pop(product_id, ()):
                    self._cards.pop(embedding_id, None)

    def clear(self) -> None:
        self.forget(everything=True)

    def __len__(self) -> int:
        return len(self._cards)

    def _unlink(self, embedding_id: int, product_id: int) -> None:
        held = self._of_product.get(product_id)
        if held is not None:
            held.discard(embedding_id)
            if not held:
                del self._of_product[product_id]
