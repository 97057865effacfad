from django.apps import AppConfig


class ChatsiteConfig(AppConfig):
    name = "chatsite"

    def ready(self) -> None:
        from payi_guard.log import configure_json

        # One JSON line per event (genai_call, budget_exceeded, ...) on stdout; an app
        # with its own structlog setup skips this.
        configure_json()
