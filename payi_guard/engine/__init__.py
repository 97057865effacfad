"""The engine: decides, reserves before each GenAI call, settles after it, logs everything.

* :mod:`~payi_guard.engine.guard`: :class:`Guard`, the public facade;
* :mod:`~payi_guard.engine.calls`: :class:`CallRequest` and :class:`CallRecord`;
* :mod:`~payi_guard.engine.parts`: what one guard is made of, shared by its helpers;
* :mod:`~payi_guard.engine.policy`: who is charged (:class:`Subject`) and which limits
  apply (:class:`BoundLimit`), a user's tier included;
* :mod:`~payi_guard.engine.tiers`: the app's ``tier_of``, called from sync and async code
  and cached;
* :mod:`~payi_guard.engine.views`: planning calls, reading usage and exhausted limits;
* :mod:`~payi_guard.engine.operator`: an operator's ``adjust`` and ``reset``, and the
  history of both;
* :mod:`~payi_guard.engine.plan`: counters, charges and the upper-bound cost of a call;
* :mod:`~payi_guard.engine.bookkeeper`: reserve, commit and release in the ledger under
  the storage-error policy, and the log events;
* :mod:`~payi_guard.engine.reservation`: :class:`Reservation`, settled exactly once;
* :mod:`~payi_guard.engine.spent`: counters known to be spent, refused locally;
* :mod:`~payi_guard.engine.storage`: the ledgers, opened on first use;
* :mod:`~payi_guard.engine.watch`: reload on file change;
* :mod:`~payi_guard.engine.observers`: code told of every call and refusal (telemetry).

The refusals it raises (:class:`~payi_guard.UserRequired`,
:class:`~payi_guard.UnknownModelRefused`) live in :mod:`payi_guard.exceptions` and are
re-exported here.
"""

from payi_guard.engine.calls import CallRecord, CallRequest
from payi_guard.engine.guard import Guard
from payi_guard.engine.observers import CallEnded, CallRefused, Observer, Observers
from payi_guard.engine.policy import ANONYMOUS_USER, BoundLimit, Subject, is_anonymous_id
from payi_guard.engine.reservation import Reservation
from payi_guard.exceptions import UnknownModelRefused, UserRequired

__all__ = [
    "ANONYMOUS_USER",
    "BoundLimit",
    "CallEnded",
    "CallRecord",
    "CallRefused",
    "CallRequest",
    "Guard",
    "Observer",
    "Observers",
    "Reservation",
    "Subject",
    "UnknownModelRefused",
    "UserRequired",
    "is_anonymous_id",
]
