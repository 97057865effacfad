"""Django integration: :class:`GuardMiddleware` and :func:`get_guard`.

::

    # settings.py
    MIDDLEWARE = [
        ...,
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "payi_guard.django.GuardMiddleware",  # after AuthenticationMiddleware
    ]
    PAYI_GUARD = {
        "config": BASE_DIR / "budgets.yaml",  # or a dict
        "guarded_paths": ["/api/*"],
        "user": "myapp.billing.user_id",      # optional: (request) -> id; default request.user.pk
    }

    # views.py
    from payi_guard.django import get_guard

    llm = get_guard().wrap(openai.OpenAI())   # every call is charged to request.user

``PAYI_GUARD`` keys:

* ``config``: the budgets YAML path, or the same as a dict; or instead ``guard``: the
  dotted path of a :class:`~payi_guard.Guard` (or of a callable returning one), for a
  guard built with more options (a clock, a pseudonymizer, ``storage``);
* ``user``: the dotted path of a callable ``(request) -> user id or None`` (sync or
  async; an async one saves a thread hop under ASGI), or ``(request) -> (user id,
  tier)`` to name the user's plan too (a tier under ``tiers:``; a user listed under
  ``users:`` keeps their own entry). Default: ``request.user.pk`` of an authenticated
  user, as a string: never a username or an e-mail address;
* ``session_id``: for the ``session`` anonymous strategy, the dotted path of a callable
  ``(request) -> session id or None``; default: Django's own session, once its backend
  has checked it;
* ``guarded_paths``, ``trust_user_header``, ``user_header``, ``block_status``,
  ``budget_headers``, ``gate``, ``on_invalid_user``, ``request_id_header``,
  ``www_authenticate``: as in :class:`~payi_guard.web.options.WebOptions`.

This module imports nothing of Django: the middleware does when Django builds it, and
raises :class:`~payi_guard.MissingDependency` naming the ``django`` extra when Django is
missing.
"""

from __future__ import annotations

from payi_guard.django.conf import get_guard
from payi_guard.django.middleware import GuardMiddleware

__all__ = ["GuardMiddleware", "get_guard"]
