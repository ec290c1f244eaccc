"""Continuation: answer the player with a continuation in the style just played."""
