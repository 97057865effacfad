from django.urls import path

from chatsite import views

urlpatterns = [
    path("login", views.login),
    path("whoami", views.whoami),
    path("visit", views.visit),
    path("usage", views.usage),
    path("api/chat", views.chat),
    path("api/achat", views.achat),
    path("api/stream", views.stream),
    path("api/astream", views.astream),
]
