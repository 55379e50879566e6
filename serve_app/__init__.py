"""Roundhouse: several LLMs on one GPU behind one OpenAI-compatible endpoint."""
