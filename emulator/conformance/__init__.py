"""Checks of what the project writes and receives against tables kept in profiles/."""
