"""Prompting and reasoning on lmforge's own models: slot templates (`template`), demonstrations chosen and ordered
(`examples`) and fitted to the context (`budget`), prompts for base and chat models with prompt repetition
(`prompt`), batched completions on the decode engine (`completion`), answers and the self-consistency vote
(`answers`), Auto-CoT (`autocot`), the methods (`methods`) and a run over task questions (`run`); `lmforge prompt`
(`commands`) runs them. The package imports nothing heavy: the CLI reads its options without torch."""
