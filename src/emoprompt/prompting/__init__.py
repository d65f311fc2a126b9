"""Prompts: prompt files, rendering a tweet into a prompt, few-shot selection, parsing."""
