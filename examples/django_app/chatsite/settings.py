"""Settings of the example site: Django's auth and sessions, and payi_guard's middleware."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-secret-key-change-me")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "chatsite",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "payi_guard.django.GuardMiddleware",  # after AuthenticationMiddleware
]

PAYI_GUARD = {
    "config": BASE_DIR.parent / "budgets.yaml",  # shared with the other examples
    # The store the budgets file names (sqlite:///budgets.db, beside it), unless the
    # environment names another one (redis://... when the site runs on several hosts).
    "storage": os.environ.get("PAYI_GUARD_STORAGE"),
    "guarded_paths": ["/api/*"],  # refused before the view once the budget is spent
    "budget_headers": True,  # RateLimit headers on successful /api/* answers
}

ROOT_URLCONF = "chatsite.urls"
WSGI_APPLICATION = "chatsite.wsgi.application"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("CHATSITE_DB", BASE_DIR / "db.sqlite3"),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
