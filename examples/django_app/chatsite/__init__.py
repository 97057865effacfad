"""A small Django site whose GenAI calls are charged to the signed-in user, offline."""
